"""The training benchmarks' measurements: the loss-memory curve has the shape the paper claims.

At a fixed per-worker batch n, growing the number of workers W grows the global batch
N = W*n. The sharded local-rows loss of one rank holds [n, N] logits, so its measured peak
must grow about linearly in N; the naive full-matrix loss holds [N, N], so its peak must
grow about quadratically, and at W workers be roughly W times the local-rows peak. These are
measured allocations (torch.profiler memory events), so a regression that materialised the
full matrix on each rank, or a broken measurement, fails here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from bench import loss_memory, train_ray


@pytest.fixture(scope="module")
def points() -> Iterator[list[loss_memory.Point]]:
    # D small relative to n so the logits, not the [N, D] feature copies, dominate the peak.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield loss_memory.sweep([2, 4, 8, 16], per_worker=64, dim=16, repeats=1)
    finally:
        torch.set_num_threads(threads)


def test_local_rows_peak_grows_linearly_full_matrix_quadratically(
    points: list[loss_memory.Point],
) -> None:
    local_k, full_k = loss_memory.growth(points)
    assert 0.8 <= local_k <= 1.25, (local_k, [p.local_peak_bytes for p in points])
    assert 1.75 <= full_k <= 2.2, (full_k, [p.full_peak_bytes for p in points])


def test_full_matrix_costs_about_w_times_local_rows(points: list[loss_memory.Point]) -> None:
    for p in points:
        assert 0.6 * p.world <= p.memory_ratio <= 1.4 * p.world, (p.world, p.memory_ratio)
        # the peak holds at least one logits matrix (plus its gradient): not a formula
        assert p.local_peak_bytes >= p.local_logits_bytes
        assert p.full_peak_bytes >= 2 * p.full_logits_bytes


def test_single_worker_local_rows_is_the_full_loss() -> None:
    p = loss_memory.measure(1, 64, 16, repeats=1)
    assert math.isclose(p.local_peak_bytes, p.full_peak_bytes, rel_tol=0.05)


def test_simulated_ranks_average_to_the_full_loss() -> None:
    assert loss_memory.check_equivalence() < 1e-5


def test_summarise_skips_startup_steps() -> None:
    ends = [10.0, 12.0, 12.5, 13.0, 13.5]  # end of steps 1..5: step 2 slow, then 0.5 s/step
    m = train_ray._summarise("x", 5, 2, 64, ends, total=13.5)
    assert m.wall_pairs_per_s == pytest.approx(128.0)
    assert m.median_step_pairs_per_s == pytest.approx(128.0)
