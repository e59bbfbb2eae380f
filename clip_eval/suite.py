"""Evaluation suites: a YAML list of tasks run on one checkpoint, one JSON record per task.

Suite file::

    name: default                 # optional
    batch_size: 64                # optional, default for every task
    tasks:
      - dataset: synthetic-test   # built-in name or URI (see clip_eval.datasets)
        task: zero_shot           # zero_shot | linear_probe | few_shot | retrieval | robustness
        dataset_options: {n_test: 300}
        options: {}               # per task type, see TASK_OPTIONS

Unknown keys anywhere raise :class:`SuiteError`. :func:`run_suite` loads the model (a
``clip_core`` checkpoint directory, or OpenAI-format ``.pt``/``.safetensors`` weights with a
tokenizer merges file), runs every task and returns the records. Probe features are cached
on disk as ``.npz`` (``allow_pickle=False``) keyed by the weights hash, the dataset name and
options, the split, a hash of the split's labels and image contents, and the layer
(``pre``/``proj``).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer
from clip_core.yamlio import load_yaml
from clip_core.zeroshot import DEFAULT_TEMPLATE, ClassifierCache, classification_metrics
from clip_eval.datasets import EvalDataset, Split, load_dataset, split_for_probe
from clip_eval.metrics import c_label
from clip_eval.paired import PER_EXAMPLE, example_ids, per_example

TASK_TYPES = ("zero_shot", "linear_probe", "few_shot", "retrieval", "robustness")
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "zero_shot": {"templates": None},
    "linear_probe": {"projected": False, "refine_rounds": 3, "val_fraction": 0.2, "seed": 0},
    "few_shot": {"projected": False, "ks": [1, 2, 4, 8, 16], "seeds": [0, 1, 2], "c": None},
    "retrieval": {"ks": [1, 5, 10]},
    "robustness": {"projected": False, "probe": True},
}
_TASK_KEYS = {"dataset", "task", "options", "dataset_options", "batch_size"}
_SUITE_KEYS = {"name", "batch_size", "tasks"}
DEFAULT_SUITE = Path(__file__).parent / "suites" / "default.yaml"


class SuiteError(ValueError):
    """A suite file is malformed: unknown keys, unknown task type, bad values."""


@dataclass(frozen=True)
class Task:
    """One suite entry; ``options`` are complete (defaults filled in)."""

    dataset: str
    task: str
    options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64


@dataclass(frozen=True)
class Suite:
    """A named list of tasks."""

    name: str
    tasks: tuple[Task, ...]


def _task(raw: Any, index: int, batch_size: int) -> Task:
    if not isinstance(raw, dict):
        raise SuiteError(f"task {index}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TASK_KEYS)
    if unknown:
        raise SuiteError(f"task {index}: unknown key(s) {unknown}; allowed {sorted(_TASK_KEYS)}")
    for key in ("dataset", "task"):
        if not isinstance(raw.get(key), str):
            raise SuiteError(f"task {index}: {key!r} must be a string")
    kind = raw["task"]
    if kind not in TASK_TYPES:
        raise SuiteError(f"task {index}: unknown task {kind!r}; expected one of {TASK_TYPES}")
    options = raw.get("options") or {}
    dataset_options = raw.get("dataset_options") or {}
    if not isinstance(options, dict) or not isinstance(dataset_options, dict):
        raise SuiteError(f"task {index}: options and dataset_options must be mappings")
    bad = sorted(set(options) - set(TASK_OPTIONS[kind]))
    if bad:
        raise SuiteError(
            f"task {index} ({kind}): unknown option(s) {bad}; allowed {sorted(TASK_OPTIONS[kind])}"
        )
    size = raw.get("batch_size", batch_size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SuiteError(f"task {index}: batch_size must be a positive int, got {size!r}")
    full = {**TASK_OPTIONS[kind], **options}
    return Task(raw["dataset"], kind, full, dict(dataset_options), size)


def parse_suite(raw: Any) -> Suite:
    """A :class:`Suite` from parsed YAML; strict about keys."""
    if not isinstance(raw, dict):
        raise SuiteError("a suite must be a mapping with a 'tasks' list")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise SuiteError(f"unknown suite key(s) {unknown}; allowed {sorted(_SUITE_KEYS)}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise SuiteError("'tasks' must be a non-empty list")
    batch_size = raw.get("batch_size", 64)
    built = tuple(_task(t, i, batch_size) for i, t in enumerate(tasks))
    seen: dict[tuple[str, str], int] = {}
    for i, t in enumerate(built):
        first = seen.setdefault((t.dataset, t.task), i)
        if first != i:
            raise SuiteError(
                f"task {i} repeats task {first} (dataset {t.dataset!r}, task {t.task!r}): "
                "their metrics would share names"
            )
    return Suite(str(raw.get("name", "suite")), built)


def load_suite(path: str | os.PathLike[str]) -> Suite:
    """Read a suite YAML file (``"default"`` names the bundled default suite)."""
    p = DEFAULT_SUITE if str(path) == "default" else Path(path)
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SuiteError(f"cannot read suite {p}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SuiteError(f"suite {p} is not valid YAML: {exc}") from exc
    return parse_suite(raw)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class EvalModel:
    """A model to evaluate, its tokenizer (``None``: image-only tasks) and weights hash."""

    model: CLIP
    tokenizer: ClipTokenizer | None
    sha256: str
    name: str


def load_model(
    path: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None
) -> EvalModel:
    """A ``clip_core`` checkpoint directory, or OpenAI-format ``.pt``/``.safetensors`` weights.

    ``tokenizer`` (a BPE merges file) is required for OpenAI-format weights' text tasks and
    overrides a checkpoint's own tokenizer.
    """
    from clip_core.checkpoint import file_sha256, load_checkpoint
    from clip_core.openai import load_openai_checkpoint

    p = Path(path)
    if p.is_dir():
        loaded = load_checkpoint(p)
        model, tok, sha = loaded.model, loaded.tokenizer, loaded.weights_sha256
    elif p.suffix in (".pt", ".pth", ".bin", ".safetensors") and p.is_file():
        model, tok, sha = load_openai_checkpoint(p), None, file_sha256(p)
    else:
        raise FileNotFoundError(f"no checkpoint directory or .pt/.safetensors file at {p}")
    if tokenizer is not None:
        ctx = model.config.text.context_length
        tok = ClipTokenizer.from_merges_file(tokenizer, context_length=ctx)
    return EvalModel(model.eval(), tok, sha, p.name)


# --------------------------------------------------------------------------- features


def _batches(images: Sequence[Any], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    from PIL import Image

    from clip_core.transforms import EvalTransform, decode_image

    transform = EvalTransform(resolution)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pil = [im if isinstance(im, Image.Image) else decode_image(im) for im in chunk]
        yield torch.stack([transform(im) for im in pil])  # [B, 3, R, R]


def _split_digest(split: Split) -> str:
    """Hash of a split's labels and image contents (bytes, or PIL mode/size/pixels)."""
    h = hashlib.sha256(str(split.labels).encode())
    for image in split.images:
        if isinstance(image, bytes):
            h.update(image)
        else:
            h.update(f"{image.mode}{image.size}".encode())
            h.update(image.tobytes())
    return h.hexdigest()[:12]


#: Interval between two progress lines when stderr is not a terminal, in seconds.
PROGRESS_LINE_INTERVAL = 10.0


class _Lines:
    """Feature-extraction progress as plain lines on stderr (a log file, a pipe)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_LINE_INTERVAL:
            self.last = now
            pct = 100 * self.done / max(self.total, 1)
            print(
                f"eval {self.desc}: {self.done}/{self.total} images ({pct:.0f}%)", file=sys.stderr
            )

    def close(self) -> None:
        """Nothing to clear: every line is complete."""


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on a terminal, periodic lines otherwise; ``enabled=False``: nothing."""
    if enabled is False:
        return None
    if not sys.stderr.isatty():
        return _Lines(total, desc)
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # tqdm is not a declared dependency: plain lines then
        return _Lines(total, desc)
    return tqdm(total=total, desc=desc, unit="img", leave=False)


@dataclass
class Runner:
    """Shared state of one suite run: the model, classifier cache and feature cache dir."""

    model: EvalModel
    cache_dir: Path | None = None
    progress: bool | None = False
    classifiers: ClassifierCache = field(default_factory=ClassifierCache)
    cache_hits: int = 0
    cache_misses: int = 0

    def features(
        self, dataset: EvalDataset, split_name: str, split: Split, *, projected: bool, batch: int
    ) -> np.ndarray:
        """Image features [N, F] (before or after projection), from the disk cache if there."""
        layer = "proj" if projected else "pre"
        digest = _split_digest(split)
        key = f"{self.model.sha256[:16]}-{dataset.fingerprint}-{split_name}-{digest}-{layer}"
        path = None if self.cache_dir is None else self.cache_dir / f"{key}.npz"
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as cached:
                self.cache_hits += 1
                return np.asarray(cached["features"])
        self.cache_misses += 1
        from clip_core.probe import extract_features

        res = self.model.model.config.vision.image_size
        bar = _progress(len(split), f"{dataset.name}/{split_name}", self.progress)
        feats = extract_features(
            self.model.model,
            _batches(split.images, res, batch),
            projected=projected,
            on_batch=None if bar is None else bar.update,
        ).numpy()  # [N, F]
        if bar is not None:
            bar.close()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, features=feats)
            tmp.replace(path)
        return feats

    def tokenizer(self) -> ClipTokenizer:
        """The tokenizer, or a clear error for text tasks without one."""
        if self.model.tokenizer is None:
            raise SuiteError(
                f"{self.model.name} has no tokenizer; pass a BPE merges file (--tokenizer)"
            )
        return self.model.tokenizer

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """The (cached) zero-shot classifier [C, D]."""
        return self.classifiers.get_or_build(
            self.model.sha256,
            self.model.model.encode_text,
            self.tokenizer(),
            classnames=classnames,
            templates=templates,
        )

    def zero_shot(
        self,
        embeddings: np.ndarray,
        labels: Sequence[int],
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> dict[str, float]:
        """Metrics of the ensembled classifier on precomputed projected embeddings [N, D]."""
        logits = self.zero_shot_logits(embeddings, classnames, templates)  # [N, C]
        return classification_metrics(logits, torch.tensor(labels))

    def zero_shot_logits(
        self, embeddings: np.ndarray, classnames: Sequence[str], templates: Sequence[str]
    ) -> torch.Tensor:
        """Cosine logits [N, C] of the ensembled classifier on projected embeddings [N, D]."""
        weights = self.classifier(classnames, templates)  # [C, D]
        feats = F.normalize(torch.from_numpy(embeddings).float(), dim=-1)  # [N, D]
        return feats @ weights.T


# --------------------------------------------------------------------------- tasks


def _zero_shot(run: Runner, ds: EvalDataset, task: Task) -> dict[str, Any]:
    templates = tuple(task.options["templates"] or ds.templates)
    emb = run.features(ds, "test", ds.test, projected=True, batch=task.batch_size)
    labels = ds.test.labels
    ensemble = run.zero_shot(emb, labels, ds.classnames, templates)
    bare = run.zero_shot(emb, labels, ds.classnames, ("{}",))
    single = run.zero_shot(emb, labels, ds.classnames, (DEFAULT_TEMPLATE,))
    gain = {
        "bare_top1": bare["top1"],
        "single_top1": single["top1"],
        "ensemble_top1": ensemble["top1"],
        "ensemble_vs_bare": ensemble["top1"] - bare["top1"],
        "ensemble_vs_single": ensemble["top1"] - single["top1"],
    }
    return {
        "metrics": {**ensemble, "chance": 1 / len(ds.classnames), "ensembling": gain},
        "templates": list(templates),
        "images": len(ds.test),
        PER_EXAMPLE: per_example(  # pairs this evaluation with another (promotion)
            example_ids(ds.test.images),
            run.zero_shot_logits(emb, ds.classnames, templates).numpy(),
            labels,
        ),
    }


def _probe_data(
    run: Runner, ds: EvalDataset, task: Task
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, test = split_for_probe(ds)
    proj, size = bool(task.options["projected"]), task.batch_size
    xtr = run.features(
        ds, "train" if train is ds.train else "probe-train", train, projected=proj, batch=size
    )
    xte = run.features(
        ds, "test" if test is ds.test else "probe-test", test, projected=proj, batch=size
    )
    return xtr, np.asarray(train.labels), xte, np.asarray(test.labels)


def _linear_probe(run: Runner, ds: EvalDataset, task: Task) -> dict[str, Any]:
    from clip_core.probe import linear_probe

    xtr, ytr, xte, yte = _probe_data(run, ds, task)
    o = task.options
    result = linear_probe(
        xtr,
        ytr,
        xte,
        yte,
        val_fraction=float(o["val_fraction"]),
        refine_rounds=int(o["refine_rounds"]),
        seed=int(o["seed"]),
    )
    sweep = {c_label(c): acc for c, acc in sorted(result.sweep.items())}
    metrics = {**result.metrics, "C": result.C, "sweep": sweep, "train_examples": len(ytr)}
    return {"metrics": metrics, "templates": [], "images": len(ytr) + len(yte)}


def _few_shot(run: Runner, ds: EvalDataset, task: Task) -> dict[str, Any]:
    from clip_core.probe import effective_data_efficiency, few_shot_probe, stratified_split

    xtr, ytr, xte, yte = _probe_data(run, ds, task)
    o = task.options
    tr, va = stratified_split(ytr, fraction=0.2, seed=0)
    result = few_shot_probe(
        xtr[tr],
        ytr[tr],
        xte,
        yte,
        ks=[int(k) for k in o["ks"]],
        seeds=[int(s) for s in o["seeds"]],
        c=None if o["c"] is None else float(o["c"]),
        val_x=xtr[va],
        val_y=ytr[va],
    )
    metrics: dict[str, Any] = {
        "ks": list(result.ks),
        "mean_top1": result.mean,
        "std_top1": result.std,
        "accuracies": {str(k): v for k, v in result.accuracies.items()},
    }
    templates: list[str] = []
    if run.model.tokenizer is not None:
        emb = run.features(ds, "test", ds.test, projected=True, batch=task.batch_size)
        zs = run.zero_shot(emb, ds.test.labels, ds.classnames, ds.templates)["top1"]
        eff = effective_data_efficiency(result.ks, result.mean, zs)
        metrics["zero_shot_top1"] = zs
        metrics["effective_data_efficiency"] = None if math.isinf(eff) else eff
        templates = list(ds.templates)
    return {"metrics": metrics, "templates": templates, "images": len(ytr) + len(yte)}


def _retrieval(run: Runner, ds: EvalDataset, task: Task) -> dict[str, Any]:
    from clip_core.retrieval import flatten_captions, recall_chance, retrieval_recall

    if ds.test.captions is None:
        raise SuiteError(f"dataset {ds.name!r} has no captions for retrieval")
    emb = run.features(ds, "test", ds.test, projected=True, batch=task.batch_size)
    texts, owners = flatten_captions(ds.test.captions)
    tok = run.tokenizer()
    with torch.no_grad():
        text_emb = torch.cat(
            [
                run.model.model.encode_text(tok(texts[i : i + 256], truncate=True))
                for i in range(0, len(texts), 256)
            ]
        )  # [T, D]
    metrics = retrieval_recall(
        torch.from_numpy(emb), text_emb, owners, ks=[int(k) for k in task.options["ks"]]
    )
    metrics_any: dict[str, Any] = {**metrics, "images": len(ds.test), "captions": len(texts)}
    per_image = max(round(len(texts) / max(len(ds.test), 1)), 1)  # captions per image
    metrics_any["chance"] = {
        f"image_to_text_R@{k}": recall_chance(len(texts), min(per_image, len(texts)), int(k))
        for k in task.options["ks"]
    } | {f"text_to_image_R@{k}": recall_chance(len(ds.test), 1, int(k)) for k in task.options["ks"]}
    return {"metrics": metrics_any, "templates": [], "images": len(ds.test)}


def _robustness(run: Runner, ds: EvalDataset, task: Task) -> dict[str, Any]:
    from clip_core.probe import fit_logistic, linear_probe, probe_metrics
    from clip_core.robustness import relative_accuracy_drop

    if ds.reference is None:
        raise SuiteError(f"dataset {ds.name!r} has no in-distribution reference split")
    size, out = task.batch_size, {}
    if run.model.tokenizer is not None:
        ref = run.features(ds, "reference", ds.reference, projected=True, batch=size)
        emb = run.features(ds, "test", ds.test, projected=True, batch=size)
        iid = run.zero_shot(ref, ds.reference.labels, ds.classnames, ds.templates)["top1"]
        shift = run.zero_shot(emb, ds.test.labels, ds.classnames, ds.templates)["top1"]
        out["zero_shot"] = {
            "id_top1": iid,
            "shift_top1": shift,
            "relative_drop": relative_accuracy_drop(iid, shift) if iid else None,
        }
    if task.options["probe"] and ds.train is not None:
        proj = bool(task.options["projected"])
        xtr = run.features(ds, "train", ds.train, projected=proj, batch=size)
        xref = run.features(ds, "reference", ds.reference, projected=proj, batch=size)
        xte = run.features(ds, "test", ds.test, projected=proj, batch=size)
        ytr = np.asarray(ds.train.labels)
        fit = linear_probe(xtr, ytr, xref, ds.reference.labels, refine_rounds=1)
        iid_p = fit.metrics["top1"]
        # the same refit (train + val with the chosen C), scored on the shifted test set
        clf, scaler = fit_logistic(xtr, ytr, c=fit.C)
        shift_p = probe_metrics(clf, scaler, xte, ds.test.labels)["top1"]
        out["linear_probe"] = {
            "id_top1": iid_p,
            "shift_top1": shift_p,
            "relative_drop": relative_accuracy_drop(iid_p, shift_p) if iid_p else None,
        }
    templates = list(ds.templates) if "zero_shot" in out else []
    return {"metrics": out, "templates": templates, "images": 2 * len(ds.test)}


TASKS: dict[str, Callable[[Runner, EvalDataset, Task], dict[str, Any]]] = {
    "zero_shot": _zero_shot,
    "linear_probe": _linear_probe,
    "few_shot": _few_shot,
    "retrieval": _retrieval,
    "robustness": _robustness,
}


def run_suite(
    model_path: str | os.PathLike[str] | EvalModel,
    suite: Suite | str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    progress: bool | None = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every task of ``suite`` on the model; one JSON-able record per task.

    ``progress``: ``None`` or ``True``: a bar on a terminal, else a line on stderr every
    ``PROGRESS_LINE_INTERVAL`` s of feature extraction and one per finished task;
    ``False``: quiet.

    Record keys: ``suite``, ``dataset``, ``dataset_options``, ``model``, ``checkpoint_sha256``,
    ``task``, ``options``, ``metrics``, ``classnames``, ``templates``, ``timing`` (``seconds``,
    ``images``, ``images_per_s``), and for zero-shot ``per_example`` (image content ids and
    0/1 top-1 outcomes, :mod:`clip_eval.paired`). ``cache_dir`` enables the on-disk feature cache.
    """
    model = (
        model_path
        if isinstance(model_path, EvalModel)
        else load_model(model_path, tokenizer=tokenizer)
    )
    parsed = suite if isinstance(suite, Suite) else load_suite(suite)
    runner = Runner(model, None if cache_dir is None else Path(cache_dir), progress)
    loaded: dict[tuple[str, str], EvalDataset] = {}
    records = []
    for task in parsed.tasks:
        started = time.perf_counter()
        key = (task.dataset, repr(sorted(task.dataset_options.items())))
        if key not in loaded:
            loaded[key] = load_dataset(task.dataset, **task.dataset_options)
        ds = loaded[key]
        load_seconds = time.perf_counter() - started
        with torch.inference_mode(False), torch.no_grad():
            out = TASKS[task.task](runner, ds, task)
        seconds = time.perf_counter() - started
        record = {
            "suite": parsed.name,
            "dataset": task.dataset,
            "dataset_options": task.dataset_options,
            "model": model.name,
            "checkpoint_sha256": model.sha256,
            "task": task.task,
            "options": task.options,
            "metrics": out["metrics"],
            **({PER_EXAMPLE: out[PER_EXAMPLE]} if PER_EXAMPLE in out else {}),
            "classnames": list(ds.classnames),
            "templates": out["templates"],
            "timing": {
                "seconds": round(seconds, 3),
                "dataset_load_seconds": round(load_seconds, 3),
                "images": out["images"],
                "images_per_s": round(out["images"] / seconds, 1) if seconds > 0 else None,
            },
        }
        records.append(record)
        if progress is not False and not sys.stderr.isatty():
            print(
                f"eval {len(records)}/{len(parsed.tasks)} {task.dataset} {task.task}: "
                f"{seconds:.1f} s",
                file=sys.stderr,
            )
        if on_record is not None:
            on_record(record)
    return records
