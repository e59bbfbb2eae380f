"""Contrastive loss: reference values, temperature, and gradient-exact sharding."""

from __future__ import annotations

import math
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F
from dist_workers import loss_worker, make_batch, make_model
from safetensors.torch import load_file

from clip_core import contrastive_loss, local_rows_loss


def _naive_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """The loss written out with explicit loops (independent of the implementation)."""
    n = img.shape[0]
    sims = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    row = sum(math.log(sum(math.exp(s) for s in sims[i])) - sims[i][i] for i in range(n)) / n
    col = (
        sum(math.log(sum(math.exp(sims[i][j]) for i in range(n))) - sims[j][j] for j in range(n))
        / n
    )
    return (row + col) / 2


def test_loss_matches_explicit_formula() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.0, dtype=torch.float64)
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(_naive_loss(img, txt, 14.0))
    # asymmetric features: the two directions differ, the loss is their mean
    assert local_rows_loss(img, txt, scale).item() == pytest.approx(_naive_loss(img, txt, 14.0))


def test_perfect_alignment_has_low_loss() -> None:
    x = F.normalize(torch.eye(8), dim=-1)
    assert contrastive_loss(x, x, torch.tensor(100.0)).item() < 1e-3
    assert contrastive_loss(x, x.roll(1, 0), torch.tensor(100.0)).item() > 10


SPECS = [
    {"id": f"{m}-{d}", "model": m, "dtype": d, "n": "8", "seed": "3"}
    for m, d in [("tiny-vit", "float64"), ("tiny-vit", "float32"), ("tiny-rn", "float64")]
]


@pytest.fixture(scope="module")
def distributed_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run every spec once in 2 spawned gloo processes (one start-up for all cases)."""
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    init_file, world = tmp / "rendezvous", 2
    procs = [
        ctx.Process(target=loss_worker, args=(r, world, str(init_file), str(tmp), SPECS))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {s["id"]: load_file(str(tmp / f"{s['id']}.safetensors")) for s in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=[s["id"] for s in SPECS])
def test_sharded_loss_equals_global_loss_in_value_and_gradient(
    distributed_results: dict[str, dict[str, torch.Tensor]], spec: dict[str, str]
) -> None:
    """2 gloo processes with DDP == one process on the concatenated batch (rel. err < 1e-5)."""
    result = distributed_results[spec["id"]]
    torch_dtype = getattr(torch, spec["dtype"])
    images, tokens = make_batch(spec["model"], 8, 3, torch_dtype)
    model = make_model(spec["model"], 3, torch_dtype)
    out = model(images, tokens)
    loss = contrastive_loss(out.image_features, out.text_features, out.logit_scale)
    loss.backward()

    assert abs(result["loss"].item() - loss.item()) / abs(loss.item()) < 1e-5
    grads = {k.removeprefix("grad."): v for k, v in result.items() if k.startswith("grad.")}
    params = dict(model.named_parameters())
    assert set(grads) == {k for k, p in params.items() if p.grad is not None}
    # Relative error per parameter. A few gradients are zero in exact arithmetic (the attention
    # pool's key bias: softmax ignores a constant added to every key); for those the
    # denominator is floored at 1e-6 of the whole model's gradient norm.
    total = torch.stack([p.grad.double().norm() for p in params.values() if p.grad is not None])
    floor = 1e-6 * total.norm()
    worst, worst_name = 0.0, ""
    for name, g in grads.items():
        ref = params[name].grad
        assert ref is not None
        dist_grad = g.double()
        err = (dist_grad - ref.double()).norm() / torch.maximum(ref.double().norm(), floor)
        if err.item() > worst:
            worst, worst_name = err.item(), name
    assert worst < 1e-5, f"worst relative gradient error {worst:.2e} ({worst_name})"
