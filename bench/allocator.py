"""Allocator tuning benchmark: training steps with and without ``tune_allocator``.

glibc's malloc settings are process-wide and read once, so each variant runs in its own child
process; children alternate (default, tuned, default, tuned, ...) in the same session and the
report is the ratio of their total step times. Each step builds fresh input tensors, as a data
loader does.

    .venv/bin/python -m bench.allocator [--model tiny-vit] [--batch 128] [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence


def child(model_name: str, batch: int, steps: int, tuned: bool) -> list[float]:
    """Run ``steps`` training steps in this process; returns per-step seconds."""
    if tuned:
        from clip_train.runtime import tune_allocator

        tune_allocator()
    import torch

    from clip_core import create_model, local_rows_loss
    from clip_train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(model_name)
    opt = build_optimizer(model, 1e-4, 0.2)
    size, length, vocab = model.image_size, model.context_length, model.config.text.vocab_size
    times = []
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size)  # [B, 3, R, R]
        tokens = torch.randint(1, vocab - 1, (batch, length))  # [B, L]
        tokens[:, length // 2] = vocab - 1
        start = time.perf_counter()
        out = model(images, tokens)
        loss = local_rows_loss(out.image_features, out.text_features, out.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Alternate default/tuned children and print total step time per variant and the ratio."""
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.batch, args.steps, args.child == "tuned")))
        return 0
    totals: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for variant in ("default", "tuned"):
            cmd = [sys.executable, "-m", "bench.allocator", "--child", variant]
            cmd += ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            steps = json.loads(out.strip().splitlines()[-1])
            totals[variant].append(sum(steps))
            print(f"{variant:>7}: {sum(steps):7.2f} s for {args.steps} steps", flush=True)
    default, tuned = statistics.median(totals["default"]), statistics.median(totals["tuned"])
    print(f"{args.model} batch {args.batch}: default {default:.2f} s, tuned {tuned:.2f} s, ")
    print(f"speed-up {default / tuned:.2f}x (median over {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
