"""The embedded defaults of the demo and the tiny deployment (no Prefect import here)."""

from __future__ import annotations

from pathlib import Path

#: The demo corpus (clip_data.corpora.read_demo_mix): procedural image-caption pairs with
#: held-out colour/shape compositions, interleaved with captioned Fashion-MNIST training
#: images and the training part of the Tux Paint stamps.
DEMO_SOURCE = "demo-mix:synthetic=6144,synthetic_test=512,fashion=26000,tuxpaint=4,seed=0"
#: The demo's training recipe (clip_train/recipes/demo.yaml: tiny-vit, 3 epochs of the mix).
DEMO_RECIPE = "demo"
#: The demo suite: the default suite plus Fashion-MNIST zero-shot and linear probe.
DEMO_SUITE = str(Path(__file__).resolve().parent.parent / "configs" / "demo-suite.yaml")
