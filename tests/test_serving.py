"""A real client against ``mlflow models serve -m models:/NAME@champion``.

A tiny CLIP that knows colours (random towers, projections fitted to colour prompts; see
test_registry_support) is logged as a training run, registered with ``clipops register``
(first version: champion) and served by MLflow's scoring server in a subprocess on a loopback
port, started in an empty working directory with the local environment (no conda). Requests
are plain HTTP POSTs of JSON to ``/invocations``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from prod_stack import free_port
from test_registry_support import (
    COLOUR_NAMES,
    COLOUR_TEMPLATE,
    colour_checkpoint,
    colour_png,
    log_training_run,
)

from clip_cli.main import main
from clip_core.checkpoint import load_checkpoint
from clip_core.transforms import EvalTransform
from clip_core.zeroshot import build_classifier

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]
NAME = "clip-colours"
START_TIMEOUT_S = 240


@dataclass(frozen=True)
class Server:
    """A running scoring server and the checkpoint it serves."""

    url: str
    checkpoint: Path
    log: Path


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


def post(server: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST JSON to /invocations; (status, decoded JSON body) for success and errors alike."""
    req = urllib.request.Request(
        f"{server.url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"{url}/ping") == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Register the colour model (champion) and serve it; the process group dies at the end."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ckpt = colour_checkpoint(root / "colour-ckpt")
    run_id = log_training_run(uri, ckpt, "colours")
    assert main(["register", "--run", run_id, "--name", NAME, "--tracking-uri", uri]) == 0
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow and uvicorn of this environment
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion"]
    cmd += ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    workdir = root / "empty-cwd"
    workdir.mkdir()
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(proc, url, log)
        yield Server(url, ckpt, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _reference_embeddings(
    ckpt: Path, images: list[bytes], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-process model, straight from clip_core (no clip_registry code)."""
    loaded = load_checkpoint(ckpt)
    assert loaded.tokenizer is not None
    model, tok = loaded.model, loaded.tokenizer
    transform = EvalTransform(model.image_size)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = F.normalize(model.encode_image(pixels), dim=-1)  # [N, D]
        txt = F.normalize(model.encode_text(tok(texts)), dim=-1)  # [M, D]
    return img, txt


def test_embeddings_match_in_process_model(server: Server) -> None:
    red, blue = colour_png("red", 7), colour_png("blue", 8)
    body = {
        "dataframe_split": {
            "columns": ["image", "text"],
            "data": [[_b64(red), "a red picture."], [_b64(blue), None], [None, "a dog"]],
        },
        "params": {"task": "embed"},
    }
    status, out = post(server, body)
    assert status == 200, out
    rows = out["predictions"]
    assert len(rows) == 3
    assert rows[1]["text_embedding"] is None and rows[2]["image_embedding"] is None
    img_ref, txt_ref = _reference_embeddings(
        server.checkpoint, [red, blue], ["a red picture.", "a dog"]
    )
    got_img = torch.tensor([rows[0]["image_embedding"], rows[1]["image_embedding"]])
    got_txt = torch.tensor([rows[0]["text_embedding"], rows[2]["text_embedding"]])
    torch.testing.assert_close(got_img, img_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_txt, txt_ref, atol=1e-5, rtol=1e-4)
    assert torch.linalg.norm(got_img, dim=-1) == pytest.approx([1.0, 1.0], abs=1e-5)

    # dataframe_records without params: embed is the default task
    status, out = post(server, {"dataframe_records": [{"text": "a dog"}]})
    assert status == 200, out
    torch.testing.assert_close(
        torch.tensor(out["predictions"][0]["text_embedding"]), txt_ref[1], atol=1e-5, rtol=1e-4
    )


def test_zero_shot_names_the_colour(server: Server) -> None:
    colours = ["green", "purple", "yellow"]
    images = [colour_png(c, 100 + i) for i, c in enumerate(colours)]  # unseen noise seeds
    labels = list(reversed(COLOUR_NAMES))  # not the training order: labels follow the request
    body = {
        "dataframe_records": [{"image": _b64(png)} for png in images],
        "params": {"task": "zero_shot", "labels": labels, "templates": [COLOUR_TEMPLATE]},
    }
    status, out = post(server, body)
    assert status == 200, out
    rows = out["predictions"]
    assert [r["label"] for r in rows] == colours

    loaded = load_checkpoint(server.checkpoint)
    assert loaded.tokenizer is not None
    model = loaded.model
    with torch.no_grad():
        weights = build_classifier(model.encode_text, loaded.tokenizer, labels, [COLOUR_TEMPLATE])
        img, _ = _reference_embeddings(server.checkpoint, images, ["x"])
        probs = (model.logit_scale.exp() * img @ weights.T).softmax(dim=-1)  # [3, C]
    got = torch.tensor([r["probabilities"] for r in rows])
    torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
    assert [r["score"] for r in rows] == pytest.approx(probs.max(dim=-1).values.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dataframe_records": [{"image": "not base64 !!"}]}, "is not valid base64"),
        ({"dataframe_records": [{"image": _b64(b"hello, not an image")}]}, "not a decodable image"),
        ({"dataframe_records": [{"caption": "a dog"}]}, "needs an 'image' column"),
        (
            {
                "dataframe_records": [{"image": _b64(colour_png("red", 1))}],
                "params": {"task": "zero_shot", "labels": []},
            },
            "needs params.labels",
        ),
        (
            {"dataframe_records": [{"text": "a dog"}], "params": {"task": "translate"}},
            "params.task must be one of",
        ),
        ({"rows": [{"text": "a dog"}]}, "dataframe_split"),
    ],
)
def test_malformed_requests_get_4xx_and_server_keeps_serving(
    server: Server, body: dict[str, Any], message: str
) -> None:
    status, out = post(server, body)
    assert 400 <= status < 500, (status, out)
    assert message in out["message"], out["message"]
    assert _get(f"{server.url}/ping") == 200
    status, ok = post(server, {"dataframe_records": [{"text": "still here"}]})
    assert status == 200 and len(ok["predictions"][0]["text_embedding"]) > 0
