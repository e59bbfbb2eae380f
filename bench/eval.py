"""Zero-shot evaluation throughput on CPU vs the bare image forward pass on the same batches.

For each model (random weights; the tokenizer is trained on synthetic captions), the same
preprocessed synthetic test batches go through:

* ``bare``: ``model.encode_image(batch)`` and nothing else;
* ``zero_shot``: :func:`clip_core.zeroshot.zero_shot_logits` with a prebuilt (cached)
  10-class x 3-template classifier: encode, normalise, ``@ classifier.T``, copy to CPU;
* ``pipeline`` (informational): the suite's path from PIL images (preprocessing included).

Variants are interleaved per repeat and each throughput is the median over repeats, so the
ratio ``zero_shot / bare`` (target >= 0.9) stays meaningful on a shared machine.

Run::

    python -m bench.eval [--models tiny-vit ViT-B-32] [--repeats N] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clip_core.probe import extract_features
from clip_core.registry import create_model, get_model_config
from clip_core.synthetic import SyntheticConfig, class_prompts, generate
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform
from clip_core.zeroshot import ClassifierCache, zero_shot_logits

# (batch size, batches) per model: ~1 minute in all on 2 CPU cores.
PLANS: dict[str, tuple[int, int]] = {"tiny-vit": (64, 4), "ViT-B-32": (8, 3)}


@dataclass(frozen=True)
class Result:
    """Median images/s per variant and the zero-shot / bare ratio."""

    model: str
    batch: int
    images: int
    bare_ips: float
    zero_shot_ips: float
    pipeline_ips: float
    ratio: float
    classifier_build_s: float


def _median_ips(fn: Callable[[], object], images: int, times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append(images / (time.perf_counter() - start))


def bench_model(name: str, repeats: int) -> Result:
    """Time the three variants of one model (see the module docstring)."""
    batch, n_batches = PLANS.get(name, (16, 2))
    cfg = get_model_config(name)
    res = cfg.vision.image_size
    samples = list(generate(batch * n_batches, "test", SyntheticConfig(image_size=64)))
    captions = [s.caption for s in samples]
    tok = ClipTokenizer.train(captions, 600, context_length=cfg.text.context_length)
    torch.manual_seed(0)
    model = create_model(name, text={"vocab_size": tok.vocab_size}).eval()
    transform = EvalTransform(res)
    pil = [s.image for s in samples]
    batches = [
        torch.stack([transform(im) for im in pil[i : i + batch]]) for i in range(0, len(pil), batch)
    ]
    start = time.perf_counter()
    classifier = ClassifierCache().get_or_build(
        "bench",
        model.encode_text,
        tok,
        classnames=class_prompts("colour"),
        templates=("a {} shape.", "a photo of something {}.", "{} objects."),
    )
    build_s = time.perf_counter() - start

    @torch.no_grad()
    def bare() -> None:
        for b in batches:
            model.encode_image(b)

    def zero_shot() -> None:
        zero_shot_logits(model, batches, classifier)

    def pipeline() -> None:
        def stream() -> Any:
            for i in range(0, len(pil), batch):
                yield torch.stack([transform(im) for im in pil[i : i + batch]])

        extract_features(model, stream(), projected=True)

    bare()  # warm-up
    zero_shot()
    times: dict[str, list[float]] = {"bare": [], "zero_shot": [], "pipeline": []}
    for _ in range(repeats):
        for key, fn in (("bare", bare), ("zero_shot", zero_shot), ("pipeline", pipeline)):
            _median_ips(fn, len(pil), times[key])
    med = {k: statistics.median(v) for k, v in times.items()}
    return Result(
        name,
        batch,
        len(pil),
        round(med["bare"], 1),
        round(med["zero_shot"], 1),
        round(med["pipeline"], 1),
        round(med["zero_shot"] / med["bare"], 3),
        round(build_s, 3),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one line per model (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PLANS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        r = bench_model(name, args.repeats)
        results.append(r)
        print(
            f"{r.model:<10} batch {r.batch:>3} x {r.images // r.batch}: "
            f"bare {r.bare_ips:8.1f} img/s  zero-shot {r.zero_shot_ips:8.1f} img/s  "
            f"ratio {r.ratio:.3f}  (with preprocessing {r.pipeline_ips:.1f} img/s; "
            f"classifier {r.classifier_build_s}s)",
            flush=True,
        )
    if args.json:
        meta = {"threads": args.threads, "load": os.getloadavg(), "torch": torch.__version__}
        payload = {"meta": meta, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
