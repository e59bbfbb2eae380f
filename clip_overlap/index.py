"""Nearest-neighbour search of evaluation queries against a stream of pretraining embeddings.

Embeddings are L2-normalised, so inner product = cosine similarity. The stored set arrives
chunk by chunk (one shard batch at a time) and the search strategy is chosen by its size:

* ``exact`` (up to ``SearchConfig.exact_max`` stored vectors): every chunk is searched with
  faiss' exact inner-product search (``IndexFlatIP``) and the per-query top-k are merged in a
  ``faiss.ResultHeap``. Nothing but the current chunk is held: memory is bounded by the chunk
  whatever the size of the stored set.
* ``ivf``: an inverted-file index (``IVF<nlist>,Flat``, ``nlist`` about ``4 * sqrt(n)``),
  trained on the first ``train_size`` vectors (buffered), then filled chunk by chunk;
  searched with ``nprobe`` lists.
* ``hnsw``: an ``HNSW<M>,Flat`` graph, filled chunk by chunk, searched with ``ef_search``.

``auto`` picks ``exact`` for small stored sets and ``ivf`` for large ones. Ids are positions
in the stream (0-based).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_core.config import reject_unknown_keys

KINDS = ("auto", "exact", "ivf", "hnsw")


@dataclass(frozen=True)
class SearchConfig:
    """How to search: top-``k``, strategy, and the approximate indexes' parameters."""

    k: int = 5
    kind: str = "auto"
    exact_max: int = 250_000
    nlist: int | None = None
    nprobe: int = 16
    train_size: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"search kind must be one of {KINDS}, got {self.kind!r}")
        if self.k < 1 or self.nprobe < 1 or self.exact_max < 0:
            raise ValueError("k and nprobe must be positive, exact_max non-negative")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchConfig:
        """Build from a dict; unknown keys are errors."""
        reject_unknown_keys(cls, raw, "search option")
        return cls(**raw)

    def resolve(self, n_stored: int) -> str:
        """The strategy used for ``n_stored`` vectors."""
        if self.kind != "auto":
            return self.kind
        return "exact" if n_stored <= self.exact_max else "ivf"

    def lists_for(self, n_stored: int) -> int:
        """IVF lists: ``nlist`` or about 4 * sqrt(n), at least 1, at most n / 39."""
        if self.nlist is not None:
            return max(1, self.nlist)
        return max(1, min(int(4 * math.sqrt(max(n_stored, 1))), n_stored // 39 or 1))


@dataclass(frozen=True)
class SearchResult:
    """Top-k similarities [Q, k] (descending; -inf where fewer than k stored) and ids [Q, k]."""

    scores: np.ndarray
    ids: np.ndarray
    kind: str
    n_stored: int


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_approximate(dim: int, n_stored: int, kind: str, config: SearchConfig) -> Any:
    """An empty ``ivf`` or ``hnsw`` faiss index for inner products (IVF still untrained)."""
    import faiss

    if kind == "ivf":
        nlist = config.lists_for(n_stored)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).nprobe = min(config.nprobe, nlist)
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        return index
    raise ValueError(f"not an approximate index kind: {kind!r}")


class _Exact:
    """Streaming exact search: each chunk searched with IndexFlatIP, top-k merged in a heap."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        import faiss

        self.queries, self.k, self.offset = queries, k, 0
        self.heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)

    def add(self, chunk: np.ndarray) -> None:
        import faiss

        index = faiss.IndexFlatIP(chunk.shape[1])
        index.add(chunk)
        scores, ids = index.search(self.queries, min(self.k, chunk.shape[0]))  # [Q, k']
        self.heap.add_result(scores, np.where(ids >= 0, ids + self.offset, -1))
        self.offset += chunk.shape[0]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self.heap.finalize()
        return self.heap.D, self.heap.I


class _Approximate:
    """Streaming fill of an IVF/HNSW index (IVF trained on the first ``train_size`` vectors)."""

    def __init__(self, queries: np.ndarray, k: int, kind: str, n: int, config: SearchConfig):
        self.queries, self.k, self.n_added = queries, k, 0
        self.index = build_approximate(queries.shape[1], n, kind, config)
        nlist = config.lists_for(n)
        self.train_size = config.train_size or min(n, max(64 * nlist, 10_000))
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, chunk: np.ndarray) -> None:
        if self.index.is_trained:
            self.index.add(chunk)
            self.n_added += chunk.shape[0]
            return
        self.buffer.append(chunk)
        self.buffered += chunk.shape[0]
        if self.buffered >= self.train_size:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        data = np.concatenate(self.buffer)  # [T, D]
        self.buffer, self.buffered = [], 0
        if not self.index.is_trained:
            self.index.train(data)
        self.index.add(data)
        self.n_added += data.shape[0]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if self.n_added == 0:
            q = self.queries.shape[0]
            return np.full((q, self.k), -np.inf, np.float32), np.full((q, self.k), -1, np.int64)
        scores, ids = self.index.search(self.queries, self.k)
        return scores, ids


def search_stream(
    queries: np.ndarray, chunks: Iterable[np.ndarray], n_stored: int, config: SearchConfig
) -> SearchResult:
    """Top-k inner-product neighbours of ``queries`` [Q, D] among the streamed ``chunks``.

    ``n_stored`` (the expected total, e.g. from the ingest manifest) selects the strategy;
    the actual count is returned in the result.
    """
    q = _f32(queries)
    kind = config.resolve(n_stored)
    searcher: _Exact | _Approximate = (
        _Exact(q, config.k)
        if kind == "exact"
        else _Approximate(q, config.k, kind, n_stored, config)
    )
    seen = 0
    for chunk in chunks:
        c = _f32(chunk)
        if c.ndim != 2 or c.shape[1] != q.shape[1]:
            raise ValueError(f"chunk shape {c.shape} does not match query dim {q.shape[1]}")
        if c.shape[0]:
            searcher.add(c)
            seen += c.shape[0]
    scores, ids = searcher.finish()
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return SearchResult(scores, ids.astype(np.int64), kind, seen)
