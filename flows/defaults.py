"""The embedded defaults of the demo and the tiny deployment (no Prefect import here)."""

from __future__ import annotations

from pathlib import Path

#: The demo corpus: procedural image-caption pairs with held-out colour/shape compositions.
DEMO_SOURCE = "synthetic:train=2048,test=512,seed=0,image_size=64"
#: The demo suite: the default suite plus Fashion-MNIST zero-shot and linear probe.
DEMO_SUITE = str(Path(__file__).resolve().parent.parent / "configs" / "demo-suite.yaml")
