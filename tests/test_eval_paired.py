"""Paired per-example comparison (clip_eval.paired): ids, pairing, the bootstrap interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from clip_eval.paired import (
    PairingError,
    example_ids,
    paired_bootstrap,
    paired_outcomes,
    per_example,
)


def _record(dataset: str, ids: list[str], correct: list[int]) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "task": "zero_shot",
        "per_example": {"ids": ids, "top1_correct": correct},
    }


def test_example_ids_follow_content_not_position() -> None:
    a = Image.new("RGB", (4, 4), (1, 2, 3))
    b = Image.new("RGB", (4, 4), (9, 9, 9))
    ids = example_ids([a, b, a.copy(), b"\x89PNG-bytes"])
    assert len(set(ids)) == 4  # the repeat of a gets its own id
    assert ids[2] == f"{ids[0]}#1"
    assert example_ids([b, a]) == [ids[1], ids[0]]


def test_per_example_outcomes_of_logits() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])  # predicts 0, 1, 0
    out = per_example(["x", "y", "z"], logits, [0, 0, 0])
    assert out == {"ids": ["x", "y", "z"], "top1_correct": [1, 0, 1]}
    with pytest.raises(PairingError, match="2 ids for 3"):
        per_example(["x", "y"], logits, [0, 0, 0])


def test_pairing_aligns_ids_in_any_order() -> None:
    cand = [_record("d", ["a", "b", "c"], [1, 0, 1])]
    champ = [_record("d", ["c", "a", "b"], [0, 1, 1])]  # other order: c=0, a=1, b=1
    pairs = paired_outcomes(cand, champ)
    a, b = pairs["d"]
    assert a.tolist() == [1, 0, 1] and b.tolist() == [1, 1, 0]  # both in id order a, b, c
    with pytest.raises(PairingError, match="in one evaluation only"):
        paired_outcomes(cand, [_record("d", ["a", "b", "q"], [1, 1, 1])])
    with pytest.raises(PairingError, match="different zero_shot datasets"):
        paired_outcomes(cand, [_record("e", ["a", "b", "c"], [1, 1, 1])])
    with pytest.raises(PairingError, match="champion has no per-example"):
        paired_outcomes(cand, [{"dataset": "d", "task": "zero_shot", "metrics": {}}])


def test_identical_outcomes_give_a_zero_interval() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.6).astype(np.int8)
    c = paired_bootstrap({"d": (x, x.copy())})
    assert (c.delta, c.low, c.high) == (0.0, 0.0, 0.0)


def test_clear_gain_and_noise_are_told_apart() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(3000) < 0.5).astype(np.int8)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:300]] = 1  # +10 points on the same examples
    gain = paired_bootstrap({"d": (better, base)})
    assert gain.delta == pytest.approx(0.1) and gain.low > 0.08 and gain.high < 0.12
    noisy = base.copy()  # 40 flips each way: no net difference
    noisy[np.flatnonzero(base == 0)[:40]] = 1
    noisy[np.flatnonzero(base == 1)[:40]] = 0
    noise = paired_bootstrap({"d": (noisy, base)})
    assert noise.delta == 0.0 and noise.low < 0 < noise.high


def test_count_bootstrap_matches_the_index_bootstrap() -> None:
    """Drawing the multinomial counts is the bootstrap: same interval as resampling rows."""
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.55).astype(np.int8)
    b = (rng.random(500) < 0.50).astype(np.int8)
    fast = paired_bootstrap({"d": (a, b)}, resamples=20_000, seed=4)
    d = a.astype(int) - b.astype(int)
    idx = np.random.default_rng(5).integers(0, len(d), size=(20_000, len(d)))
    slow_low, slow_high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert fast.low == pytest.approx(slow_low, abs=0.006)
    assert fast.high == pytest.approx(slow_high, abs=0.006)


def test_mean_over_datasets_is_stratified() -> None:
    same = np.ones(100, dtype=np.int8)
    up = np.ones(1000, dtype=np.int8)
    down = up.copy()
    down[:200] = 0
    c = paired_bootstrap({"small": (same, same), "big": (up, down)})
    assert c.delta == pytest.approx(0.1)  # (0 + 0.2) / 2: each dataset counts once
    assert c.datasets == ("big", "small") and c.examples == 1100
    with pytest.raises(PairingError, match="nothing to compare"):
        paired_bootstrap({})
