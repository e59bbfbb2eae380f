"""Duplicate-search throughput: exact vs approximate faiss search over synthetic embeddings.

The stored set is ``--stored`` L2-normalised ``--dim``-d vectors drawn around ``--clusters``
random centres (pretraining embeddings are clustered, not uniform); the queries are noisy
copies of random stored vectors (the near-duplicate case) mixed with fresh vectors from the
same clusters (the clean case). Both searches run in this process on the same queries:

* ``exact``: ``IndexFlatIP`` (what :mod:`clip_overlap.index` streams chunk by chunk);
* ``ivf`` (default) or ``hnsw``: the approximate index :mod:`clip_overlap.index` builds for
  large sets (``build_approximate``), trained/filled once, build time reported separately.

Reported: queries/s of each search, the speed-up, and the approximate index's recall@1
against exact (fraction of queries whose top-1 id is the exact top-1; target >= 0.99).

Run::

    python -m bench.overlap                       # 10,000 queries vs 1,000,000 x 512-d
    python -m bench.overlap --stored 20000 --queries 500 --dim 64   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clip_overlap.index import SearchConfig, build_approximate


@dataclass(frozen=True)
class Result:
    """One benchmark run."""

    stored: int
    queries: int
    dim: int
    kind: str
    threads: int
    exact_qps: float
    approx_qps: float
    speedup: float
    recall_at_1: float
    build_seconds: float
    exact_seconds: float
    approx_seconds: float
    nlist: int
    nprobe: int


def synthetic_vectors(
    stored: int, queries: int, dim: int, clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors [stored, dim] and queries [queries, dim] (half noisy copies)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    data = np.empty((stored, dim), np.float32)
    step = 100_000
    for start in range(0, stored, step):  # in chunks: bounded temporaries
        n = min(step, stored - start)
        owner = rng.integers(clusters, size=n)
        data[start : start + n] = centres[owner] + rng.standard_normal((n, dim), np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    n_copies = queries // 2
    copies = data[rng.integers(stored, size=n_copies)]
    copies = copies + 0.03 * rng.standard_normal(copies.shape, np.float32)
    fresh = centres[rng.integers(clusters, size=queries - n_copies)]
    fresh = fresh + rng.standard_normal((queries - n_copies, dim), np.float32)
    q = np.concatenate([copies, fresh]).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return data, q


def run(
    stored: int,
    queries: int,
    dim: int,
    *,
    kind: str = "ivf",
    clusters: int = 1000,
    nprobe: int = 16,
    nlist: int | None = None,
    seed: int = 0,
) -> Result:
    """Build both indexes on the same data and time their searches."""
    import faiss

    data, q = synthetic_vectors(stored, queries, dim, clusters, seed)
    config = SearchConfig(kind=kind, nprobe=nprobe, nlist=nlist)
    exact = faiss.IndexFlatIP(dim)
    exact.add(data)
    started = time.perf_counter()
    _, exact_ids = exact.search(q, 1)
    exact_s = time.perf_counter() - started
    del exact
    started = time.perf_counter()
    approx = build_approximate(dim, stored, kind, config)
    if not approx.is_trained:
        train_n = min(stored, max(64 * config.lists_for(stored), 10_000))
        approx.train(data[np.random.default_rng(seed).choice(stored, train_n, replace=False)])
    approx.add(data)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    _, approx_ids = approx.search(q, 1)
    approx_s = time.perf_counter() - started
    recall = float((approx_ids[:, 0] == exact_ids[:, 0]).mean())
    return Result(
        stored=stored,
        queries=queries,
        dim=dim,
        kind=kind,
        threads=faiss.omp_get_max_threads(),
        exact_qps=round(queries / exact_s, 1),
        approx_qps=round(queries / approx_s, 1),
        speedup=round(exact_s / approx_s, 2),
        recall_at_1=round(recall, 4),
        build_seconds=round(build_s, 2),
        exact_seconds=round(exact_s, 2),
        approx_seconds=round(approx_s, 3),
        nlist=config.lists_for(stored) if kind == "ivf" else 0,
        nprobe=nprobe if kind == "ivf" else 0,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints one JSON line (and writes it with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--stored", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", choices=["ivf", "hnsw"], default="ivf")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.threads is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    result = run(
        args.stored,
        args.queries,
        args.dim,
        kind=args.kind,
        clusters=args.clusters,
        nprobe=args.nprobe,
        nlist=args.nlist,
    )
    line = json.dumps({**asdict(result), "load_avg": os.getloadavg()[0]})
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
