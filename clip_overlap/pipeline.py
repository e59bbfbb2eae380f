"""The overlap analysis end to end: :func:`run_overlap` (what the CLI and the flow call).

1. The suite's ``zero_shot`` tasks name the evaluation datasets (``clip_eval.datasets``);
   every test example is embedded (dedicated detector or CLIP image tower) and hashed.
2. One streaming pass over the pretraining shards: the ``train`` rows are embedded batch by
   batch and searched (:mod:`clip_overlap.index`, exact or approximate by size); content
   hashes give exact duplicates; planted copies (``planted_from``) give ground truth.
   Verification (on by default with the dedicated detector): each query's top-k rows are
   fetched from the shards (only those rows' row groups) and re-scored by aligned
   comparison (:mod:`clip_overlap.verify`); the best verified candidate is the match.
3. Per dataset: threshold calibration (:mod:`clip_overlap.calibrate`), the detection's
   status (:mod:`clip_overlap.status`: candidates of an uncalibrated, unverified detector
   are ``unverified_candidates``, not overlap), Overlap/Clean split, per-example zero-shot
   correctness (``clip_eval.suite.Runner``), statistics (:mod:`clip_core.overlap_stats`),
   Bonferroni across datasets.
4. Files (:mod:`clip_overlap.report`): ``overlap.json``, ``overlap.md``, ``overlap.png``,
   ``pr_curve.json`` (+ ``pr_curve.png``), ``matches.jsonl``, ``contact_sheet.png``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_core.config import reject_unknown_keys
from clip_core.overlap_stats import bonferroni, overlap_statistics, precision_recall_at
from clip_eval.datasets import EvalDataset, load_dataset
from clip_eval.suite import EvalModel, Runner, Suite, load_model, load_suite
from clip_overlap.calibrate import Calibration, calibrate, simulated_pairs
from clip_overlap.embed import ClipEmbedder, DetectorEmbedder, Embedder, ImageLike, embed_all
from clip_overlap.index import SearchConfig, SearchResult, search_stream
from clip_overlap.shards import count_rows, fetch_rows, iter_batches
from clip_overlap.status import counts_as_contamination, dataset_status, report_status
from clip_overlap.verify import VerifyConfig, load_pixels, verify_pairs

VERIFY_MODES = ("auto", "on", "off")


class OverlapError(ValueError):
    """The analysis cannot run: no zero-shot task, unknown embedding, bad options."""


@dataclass(frozen=True)
class OverlapConfig:
    """Analysis settings (unknown keys are errors in :meth:`from_dict`)."""

    split: str = "train"
    min_precision: float = 0.95
    threshold: float | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int = 256
    calibration_copies: int = 500
    seed: int = 0
    sheet_pairs: int = 24
    listed_unflagged: int = 20
    verify: str = "auto"
    verifier: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise OverlapError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if not 0.0 < self.min_precision <= 1.0:
            raise OverlapError(f"min_precision must be in (0, 1], got {self.min_precision}")
        if self.batch_size < 1 or self.calibration_copies < 1:
            raise OverlapError("batch_size and calibration_copies must be positive")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OverlapConfig:
        """Build from a dict (``search`` nested); unknown keys are errors."""
        reject_unknown_keys(cls, raw, "overlap option", OverlapError)
        values = dict(raw)
        if "search" in values:
            values["search"] = SearchConfig.from_dict(dict(values["search"]))
        if "verifier" in values:
            values["verifier"] = VerifyConfig.from_dict(dict(values["verifier"]))
        return cls(**values)

    def verifies(self, embedder: Embedder) -> bool:
        """Whether the verification stage runs (``auto``: with the dedicated detector)."""
        if self.verify == "auto":
            return isinstance(embedder, DetectorEmbedder)
        return self.verify == "on"


@dataclass
class _Target:
    """One evaluation dataset of the suite and its per-example arrays."""

    label: str
    dataset: EvalDataset
    templates: tuple[str, ...]
    batch_size: int
    sha256: list[str]
    queries: np.ndarray  # [N, D]
    offset: int = 0


@dataclass
class _PassState:
    """What the streaming pass over the shards collects besides embeddings."""

    exact: dict[str, int] = field(default_factory=dict)  # eval sha -> train id
    key_sha: dict[str, str] = field(default_factory=dict)  # shard key -> sha (eval rows)
    planted: dict[str, list[int]] = field(default_factory=dict)  # planted_from key -> ids
    rows: int = 0


def image_sha256(image: ImageLike) -> str:
    """sha256 of the bytes as ingest would store them (PIL images: their clean PNG encoding)."""
    from clip_core.synthetic import encode_png

    data = image if isinstance(image, bytes) else encode_png(image)
    return hashlib.sha256(data).hexdigest()


def zero_shot_correct(runner: Runner, target: _Target) -> np.ndarray:
    """Per-example top-1 correctness [N] of the prompt-ensembled zero-shot classifier."""
    ds = target.dataset
    emb = runner.features(ds, "test", ds.test, projected=True, batch=target.batch_size)  # [N, D]
    weights = runner.classifier(ds.classnames, target.templates)  # [C, D]
    feats = torch.nn.functional.normalize(torch.from_numpy(emb).float(), dim=-1)  # [N, D]
    predicted = (feats @ weights.T).argmax(dim=-1).numpy()  # [N]
    return np.asarray(predicted == np.asarray(ds.test.labels), dtype=bool)


def _targets(suite: Suite, embedder: Embedder) -> list[_Target]:
    tasks = [t for t in suite.tasks if t.task == "zero_shot"]
    if not tasks:
        raise OverlapError(f"suite {suite.name!r} has no zero_shot task to analyse")
    targets: list[_Target] = []
    seen: dict[str, int] = {}
    for task in tasks:
        ds = load_dataset(task.dataset, **task.dataset_options)
        seen[task.dataset] = seen.get(task.dataset, 0) + 1
        label = task.dataset if seen[task.dataset] == 1 else f"{task.dataset}#{seen[task.dataset]}"
        templates = tuple(task.options.get("templates") or ds.templates)
        sha = [image_sha256(im) for im in ds.test.images]
        queries = embed_all(embedder, ds.test.images)
        targets.append(_Target(label, ds, templates, task.batch_size, sha, queries))
    offset = 0
    for t in targets:
        t.offset, offset = offset, offset + len(t.sha256)
    return targets


def _stream(
    train: str, split: str, embedder: Embedder, *, wanted: set[str], state: _PassState, size: int
) -> Iterator[np.ndarray]:
    """Embeddings of the ``split`` rows, one [B, D] chunk per batch; fills ``state``."""
    for batch in iter_batches(train, split=None, batch_size=size):
        chosen: list[int] = []
        for i, (key, sha, row_split) in enumerate(
            zip(batch.keys, batch.sha256, batch.splits, strict=True)
        ):
            if sha in wanted:
                state.key_sha[key] = sha
            if row_split != split:
                continue
            row_id = state.rows + len(chosen)
            if sha in wanted:
                state.exact.setdefault(sha, row_id)
            if batch.planted_from[i] is not None:
                state.planted.setdefault(str(batch.planted_from[i]), []).append(row_id)
            chosen.append(i)
        if chosen:
            state.rows += len(chosen)
            yield embedder.embed([batch.images[i] for i in chosen])


def verified_top1(
    train: str, images: Sequence[ImageLike], result: SearchResult, config: OverlapConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Best verified score [Q] and its stream id [Q] among each query's top-k candidates.

    Queries are taken ``queries_per_pass`` at a time: only their candidates' rows are
    fetched from the shards (:func:`clip_overlap.shards.fetch_rows`), so memory is bounded
    by the pass, not by the pretraining set.
    """
    cfg = config.verifier
    k = min(cfg.k, result.ids.shape[1])
    scores = np.full(len(images), -np.inf)  # [Q]
    best = np.full(len(images), -1, dtype=np.int64)  # [Q]
    for start in range(0, len(images), cfg.queries_per_pass):
        ids = result.ids[start : start + cfg.queries_per_pass, :k]  # [B, k]
        rows = fetch_rows(train, config.split, ids[ids >= 0].tolist())
        present = np.isin(ids, np.fromiter(rows, dtype=np.int64, count=len(rows)))  # [B, k]
        pair_q, pair_k = np.nonzero(present)  # [P], [P]
        if pair_q.size == 0:
            continue
        order = sorted(rows)
        cand_pix = load_pixels([rows[i][1] for i in order], cfg.size)  # [U, 3, S, S]
        where = {row_id: j for j, row_id in enumerate(order)}
        query_pix = load_pixels(images[start : start + ids.shape[0]], cfg.size)  # [B, 3, S, S]
        cand_index = torch.tensor(
            [where[int(ids[q, j])] for q, j in zip(pair_q, pair_k, strict=True)]
        )
        verified = verify_pairs(
            query_pix[torch.from_numpy(pair_q)], cand_pix[cand_index], cfg
        ).numpy()  # [P]
        block = np.full(ids.shape, -np.inf)  # [B, k]
        block[pair_q, pair_k] = verified
        top = block.argmax(axis=1)  # [B]
        rows_b = np.arange(ids.shape[0])
        scores[start : start + ids.shape[0]] = block[rows_b, top]
        best[start : start + ids.shape[0]] = np.where(
            np.isfinite(block[rows_b, top]), ids[rows_b, top], -1
        )
    return scores, best


def _calibration(
    target: _Target,
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    embedder: Embedder,
    config: OverlapConfig,
    verified: bool,
) -> Calibration:
    """The threshold: from the planted ground truth when there is one, else simulated."""
    if truth.any():
        return calibrate(
            scores, truth, "planted-in-shards",
            min_precision=config.min_precision, manual=config.threshold,
        )  # fmt: skip
    pair_scores, labels = simulated_pairs(
        embedder, target.dataset.test.images, target.queries, scores,
        copies=config.calibration_copies, seed=config.seed,
        verifier=config.verifier if verified else None,
    )  # fmt: skip
    return calibrate(
        pair_scores, labels, "simulated",
        min_precision=config.min_precision, manual=config.threshold,
    )  # fmt: skip


def _dataset_result(
    target: _Target,
    top1: tuple[np.ndarray, np.ndarray],
    state: _PassState,
    embedder: Embedder,
    *,
    correct: np.ndarray,
    config: OverlapConfig,
    verified: bool,
) -> tuple[dict[str, Any], Calibration, np.ndarray, np.ndarray, np.ndarray]:
    """One dataset's record, calibration, scores [N], match ids [N] and counted overlap [N].

    Candidates (exact duplicates and scores at or above the threshold) count as overlap only
    when the detection's status allows it (:mod:`clip_overlap.status`); otherwise only the
    exact duplicates do and the rest are ``unverified_candidates``.
    """
    n = len(target.sha256)
    rows = slice(target.offset, target.offset + n)
    scores, ids = top1[0][rows].astype(np.float64), top1[1][rows].copy()
    exact = np.array([sha in state.exact for sha in target.sha256], dtype=bool)  # [N]
    for i in np.flatnonzero(exact):
        scores[i], ids[i] = 1.0, state.exact[target.sha256[i]]
    sha_planted = {state.key_sha[k]: v for k, v in state.planted.items() if k in state.key_sha}
    truth = np.array([sha in sha_planted for sha in target.sha256], dtype=bool)  # [N]
    cal = _calibration(target, scores, truth, embedder=embedder, config=config, verified=verified)
    ground: dict[str, Any] | None = None
    if truth.any():
        precision, recall = precision_recall_at(
            np.where(exact, np.inf, scores), truth, cal.threshold
        )
        ground = {"planted": int(truth.sum()), "precision": precision, "recall": recall}
    score = "verified" if verified else "cosine"
    status = dataset_status(
        cal.mode, score, None if ground is None else ground["precision"], config.min_precision
    )
    candidates = exact | (scores >= cal.threshold)  # [N]
    overlap = candidates if counts_as_contamination(status) else exact  # [N]
    stats = overlap_statistics(correct, overlap).to_dict()
    record = {
        "dataset": target.dataset.name,
        "dataset_options": target.dataset.options,
        "status": status,
        **stats,
        "unverified_candidates": int((candidates & ~overlap).sum()),
        **cal.to_dict(),
        "score": score,
        "exact_duplicates": int(exact.sum()),
        "ground_truth": ground,
    }
    return record, cal, scores, ids, overlap


def run_overlap(
    train: str,
    suite: Suite | str | os.PathLike[str],
    model: str | os.PathLike[str] | EvalModel,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    detector: str | os.PathLike[str] | None = None,
    embedding: str = "detector",
    config: OverlapConfig | None = None,
) -> dict[str, Any]:
    """Run the overlap analysis; return the report dict (and write the files to ``out_dir``).

    ``detector`` is a directory from :func:`clip_overlap.detector.train_detector`; without
    one, ``embedding="clip"`` uses the model's image tower. Report keys: ``train``,
    ``model``, ``embedding``, ``search``, ``status``, ``datasets`` (label -> per-dataset
    record with status, n_all, n_overlap, n_clean, contamination, unverified_candidates,
    acc_all, acc_clean, acc_overlap, all_minus_clean, p_value, p_value_bonferroni,
    clean_ci_99_5, threshold, precision, recall, ...), ``summary``, ``seconds``.

    ``status`` (:mod:`clip_overlap.status`): without a calibrated detector (no verification
    and no planted copies reaching the target precision) the candidates above the threshold
    are ``unverified_candidates``, never overlap; only exact duplicates count.
    """
    config = config or OverlapConfig()
    started = time.perf_counter()
    evm = model if isinstance(model, EvalModel) else load_model(model)
    embedder = make_embedder(evm, detector, embedding)
    targets = _targets(suite if isinstance(suite, Suite) else load_suite(suite), embedder)
    queries = np.concatenate([t.queries for t in targets])  # [Q, D]
    wanted = {s for t in targets for s in t.sha256}
    state = _PassState()
    n_train = count_rows(train, config.split)
    chunks = _stream(
        train, config.split, embedder, wanted=wanted, state=state, size=config.batch_size
    )
    result = search_stream(queries, chunks, n_train, config.search)
    verified = config.verifies(embedder)
    top1 = (result.scores[:, 0], result.ids[:, 0])
    if verified:
        images = [im for t in targets for im in t.dataset.test.images]
        top1 = verified_top1(train, images, result, config)
    runner = Runner(evm)
    records: dict[str, dict[str, Any]] = {}
    details: dict[str, tuple[Calibration, np.ndarray, np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for t in targets:
            correct = zero_shot_correct(runner, t)
            record, cal, scores, ids, overlap = _dataset_result(
                t, top1, state, embedder, correct=correct, config=config, verified=verified
            )
            records[t.label] = record
            details[t.label] = (cal, scores, ids, overlap)
    corrected = bonferroni([r["p_value"] for r in records.values()])
    for r, p in zip(records.values(), corrected, strict=True):
        r["p_value_bonferroni"] = p
    report: dict[str, Any] = {
        "train": str(train),
        "split": config.split,
        "n_train": state.rows,
        "model": evm.name,
        "checkpoint_sha256": evm.sha256,
        "embedding": {"kind": embedder.name, "dim": embedder.dim, "detector": str(detector or "")},
        "search": {"kind": result.kind, "k": config.search.k, "n_stored": result.n_stored},
        "score": "verified" if verified else "cosine",
        "status": report_status(r["status"] for r in records.values()),
        "verify": config.verifier.to_dict() if verified else None,
        "min_precision": config.min_precision,
        "datasets": records,
        "summary": _summary(records),
    }
    if out_dir is not None:
        from clip_overlap.report import write_outputs

        needed = _needed_ids(details, config)
        rows = fetch_rows(train, config.split, needed)
        write_outputs(Path(out_dir), report, targets, details, rows=rows, config=config)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        from clip_overlap.report import write_json

        write_json(Path(out_dir) / "overlap.json", report)
    return report


def make_embedder(
    model: EvalModel, detector: str | os.PathLike[str] | None, embedding: str
) -> Embedder:
    """The detector at ``detector``, or ``embedding="clip"``: the model's image tower."""
    if detector is not None:
        from clip_overlap.detector import load_detector

        return DetectorEmbedder(load_detector(detector))
    if embedding == "clip":
        return ClipEmbedder(model.model)
    if embedding == "detector":
        raise OverlapError("the detector embedding needs --detector DIR (or use --embedding clip)")
    raise OverlapError(f"unknown embedding {embedding!r}; expected 'detector' or 'clip'")


def _needed_ids(
    details: dict[str, tuple[Calibration, np.ndarray, np.ndarray, np.ndarray]],
    config: OverlapConfig,
) -> set[int]:
    """Stream ids of every flagged match or unverified candidate and of the top other ones
    per dataset."""
    needed: set[int] = set()
    for cal, scores, ids, overlap in details.values():
        listed = overlap | (scores >= cal.threshold)  # [N]
        order = np.argsort(-scores, kind="stable")
        unflagged = [i for i in order if not listed[i]][: config.listed_unflagged]
        needed |= {int(ids[i]) for i in np.flatnonzero(listed)} | {int(ids[i]) for i in unflagged}
    return {i for i in needed if i >= 0}


def _summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    contamination = [r["contamination"] for r in records.values() if r["contamination"] is not None]
    significant = [
        k
        for k, r in records.items()
        if r["p_value_bonferroni"] is not None and r["p_value_bonferroni"] < 0.05
    ]
    return {
        "datasets": len(records),
        "with_overlap": sum(r["n_overlap"] > 0 for r in records.values()),
        "median_contamination": float(np.median(contamination)) if contamination else None,
        "mean_contamination": float(np.mean(contamination)) if contamination else None,
        "significant_after_bonferroni": significant,
        "unverified_candidates": sum(r["unverified_candidates"] for r in records.values()),
        "unverified_datasets": [
            k for k, r in records.items() if not counts_as_contamination(r["status"])
        ],
    }
