"""The embedded defaults of the demo and the tiny deployment (no Prefect import here)."""

from __future__ import annotations

from pathlib import Path

#: The demo corpus (clip_data.corpora.read_demo_mix): procedural image-caption pairs with
#: held-out colour/shape compositions, interleaved with captioned Fashion-MNIST training
#: images and the training part of the Tux Paint stamps.
DEMO_SOURCE = "demo-mix:synthetic=2048,synthetic_test=512,fashion=8000,tuxpaint=1,seed=0"
#: The demo's epochs over that mix (the tiny recipe's 10 are for the synthetic corpus alone).
DEMO_EPOCHS = 3
#: The demo suite: the default suite plus Fashion-MNIST zero-shot and linear probe.
DEMO_SUITE = str(Path(__file__).resolve().parent.parent / "configs" / "demo-suite.yaml")
