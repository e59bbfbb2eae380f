"""A real client against the served champion: ``clipops serve -m models:/NAME@champion``.

A tiny CLIP that knows colours (random towers, projections fitted to colour prompts; see
test_registry_support) is logged as a training run, registered with ``clipops register``
(first version: champion) and served in a subprocess on a loopback port, started in an empty
working directory with the local environment (no conda). Requests are plain HTTP POSTs to
``/invocations``. The server caps request bodies at :data:`CAP` bytes; malformed requests
carry :data:`MARKER`, which no error body may echo. ``mlflow models serve`` of the same model
gets the same guard (installed by the model itself): one test checks that server too.
"""

from __future__ import annotations

import base64
import http.client
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
from clip_registry.serving import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES_ENV,
    MODEL_PATH_ENV,
    max_request_bytes,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]
NAME = "clip-colours"
START_TIMEOUT_S = 240
CAP = 1 << 20  # the servers' request size cap (bytes)
MARKER = "QZX7-ECHO-MARKER"
JSON = "application/json"


@dataclass(frozen=True)
class Server:
    """A running scoring server and the checkpoint it serves."""

    url: str
    checkpoint: Path
    log: Path


@dataclass(frozen=True)
class Registered:
    """The colour model registered as champion of :data:`NAME` in a SQLite store."""

    root: Path
    uri: str
    checkpoint: Path


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


def post_raw(server: Server, data: bytes, content_type: str = JSON) -> tuple[int, bytes]:
    """POST bytes to /invocations; (status, raw body) for success and errors alike."""
    req = urllib.request.Request(
        f"{server.url}/invocations", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def post(server: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST JSON to /invocations; (status, decoded JSON body) for success and errors alike."""
    status, raw = post_raw(server, json.dumps(body).encode())
    return status, json.loads(raw)


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"{url}/ping") == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Log the colour model as a training run and register it (first version: champion)."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ckpt = colour_checkpoint(root / "colour-ckpt")
    run_id = log_training_run(uri, ckpt, "colours")
    assert main(["register", "--run", run_id, "--name", NAME, "--tracking-uri", uri]) == 0
    return Registered(root, uri, ckpt)


def _start(
    reg: Registered, name: str, args: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Server]:
    """Start ``bin/ARGS... -p PORT`` in its own process group (this environment's bin/)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # clipops, mlflow and uvicorn of this environment
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": reg.uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    cmd = [str(bin_dir / args[0]), *args[1:], "-p", str(port)]
    workdir = reg.root / f"{name}-cwd"
    workdir.mkdir()
    log = reg.root / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, Server(f"http://127.0.0.1:{port}", reg.checkpoint, log)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def servers(registered: Registered) -> Iterator[dict[str, Server]]:
    """Both servers of the champion, started together, capped at CAP bytes.

    ``clipops``: ``clipops serve`` (the documented command, cap by flag); ``mlflow``: plain
    ``mlflow models serve`` (cap by ``$CLIPOPS_SERVE_MAX_REQUEST_BYTES``).
    """
    model = f"models:/{NAME}@champion"
    started = [
        _start(
            registered,
            "clipops",
            [
                "clipops",
                "serve",
                "-m",
                model,
                "--host",
                "127.0.0.1",
                "--max-request-bytes",
                str(CAP),
            ],
            {},
        ),
        _start(
            registered,
            "mlflow",
            ["mlflow", "models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1"],
            {MAX_REQUEST_BYTES_ENV: str(CAP)},
        ),
    ]
    try:
        for proc, srv in started:
            _wait_until_up(proc, srv.url, srv.log)
        yield {"clipops": started[0][1], "mlflow": started[1][1]}
    finally:
        for proc, _ in started:
            _stop(proc)


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    """``clipops serve`` of the champion."""
    return servers["clipops"]


@pytest.fixture(scope="module")
def mlflow_server(servers: dict[str, Server]) -> Server:
    """``mlflow models serve`` of the champion."""
    return servers["mlflow"]


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
        ({"dataframe_records": [{"text": "t"}] * 10_001}, "at most 10000 per request"),
    ],
)
def test_malformed_requests_get_4xx_and_server_keeps_serving(
    server: Server, body: dict[str, Any], message: str
) -> None:
    status, out = post(server, body)
    assert 400 <= status < 500, (status, out)
    assert set(out) == {"error_code", "message"}, out
    assert message in out["message"], out["message"]
    assert _get(f"{server.url}/ping") == 200
    status, ok = post(server, {"dataframe_records": [{"text": "still here"}]})
    assert status == 200 and len(ok["predictions"][0]["text_embedding"]) > 0


def _json_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


_RED = _b64(colour_png("red", 1))
_UNDECODABLE = _b64(MARKER.encode() * 4)  # base64 text that an echo would show
_ZERO_SHOT = {"task": "zero_shot", "labels": ["red", "blue"]}
ECHO_CASES = {
    "invalid JSON": (
        b'{"dataframe_records": [{"text": "' + MARKER.encode(),
        JSON,
        "not valid JSON",
    ),
    "bad base64 image": (
        _json_body({"dataframe_records": [{"image": f"{MARKER}!!"}]}),
        JSON,
        "row 0: column 'image' is not valid base64",
    ),
    "undecodable image": (
        _json_body({"dataframe_records": [{"image": _UNDECODABLE}]}),
        JSON,
        "row 0: column 'image' is not a decodable image",
    ),
    "unknown task": (
        _json_body({"dataframe_records": [{"text": "a dog"}], "params": {"task": MARKER}}),
        JSON,
        "params.task must be one of ['embed', 'zero_shot']",
    ),
    "bad row next to a caption": (
        _json_body({"dataframe_records": [{"text": MARKER}, {"image": "%%%"}]}),
        JSON,
        "row 1: column 'image' is not valid base64",
    ),
    "duplicate labels": (
        _json_body(
            {
                "dataframe_records": [{"image": _RED}],
                "params": {**_ZERO_SHOT, "labels": ["red", MARKER, MARKER]},
            }
        ),
        JSON,
        "params.labels has duplicates at positions [2]",
    ),
    "template without a slot": (
        _json_body(
            {
                "dataframe_records": [{"image": _RED}],
                "params": {**_ZERO_SHOT, "templates": [MARKER]},
            }
        ),
        JSON,
        "params.templates at positions [0]",
    ),
    "label of the wrong type": (
        _json_body(
            {
                "dataframe_records": [{"image": _RED}],
                "params": {**_ZERO_SHOT, "labels": [MARKER, 3]},
            }
        ),
        JSON,
        "params.labels has the wrong type",
    ),
    "no input field": (
        _json_body({MARKER: [{"text": "a dog"}]}),
        JSON,
        "exactly one of the fields",
    ),
    "unsupported content type": (b"{}", f"application/x-{MARKER}", "unsupported Content-Type"),
}


@pytest.mark.parametrize("kind", list(ECHO_CASES))
def test_malformed_requests_do_not_echo_the_input(server: Server, kind: str) -> None:
    data, content_type, message = ECHO_CASES[kind]
    status, raw = post_raw(server, data, content_type)
    assert 400 <= status < 500, (status, raw[:500])
    assert MARKER.encode() not in raw and _UNDECODABLE[:16].encode() not in raw, raw[:500]
    assert b"\n" not in raw.strip(), raw[:500]  # one line
    out = json.loads(raw)
    assert set(out) == {"error_code", "message"} and message in out["message"], out


def _connect(server: Server) -> http.client.HTTPConnection:
    host, port = server.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _too_large(response: http.client.HTTPResponse) -> None:
    assert response.status == 413
    out = json.loads(response.read())
    assert out["error_code"] == "REQUEST_TOO_LARGE" and f"limit of {CAP} bytes" in out["message"]


def test_oversize_request_gets_413_before_its_body_is_sent(server: Server) -> None:
    conn = _connect(server)
    t0 = time.monotonic()
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", JSON)
    conn.putheader("Content-Length", str(CAP + 1))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()  # not one byte of the body: the answer comes from the header alone
    _too_large(conn.getresponse())
    assert time.monotonic() - t0 < 5
    conn.close()
    status, ok = post(server, {"dataframe_records": [{"text": "still here"}]})
    assert status == 200 and ok["predictions"][0]["text_embedding"]


def test_oversize_chunked_request_gets_413(server: Server) -> None:
    conn = _connect(server)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", JSON)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b" " * (64 << 10)
    for _ in range(CAP // len(chunk) + 1):  # no length given: over the cap after CAP bytes
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    _too_large(conn.getresponse())
    conn.close()
    under = _json_body({"dataframe_records": [{"text": "just under"}], "pad": " " * (CAP - 100)})
    assert len(under) <= CAP and post_raw(server, under)[0] == 200


def test_mlflow_models_serve_is_guarded_too(mlflow_server: Server) -> None:
    conn = _connect(mlflow_server)
    conn.request(
        "POST", "/invocations", b"{}", {"Content-Type": JSON, "Content-Length": str(CAP + 1)}
    )
    _too_large(conn.getresponse())
    conn.close()
    for kind in ("invalid JSON", "bad row next to a caption", "unknown task"):
        data, content_type, message = ECHO_CASES[kind]
        status, raw = post_raw(mlflow_server, data, content_type)
        assert (
            status == 400 and MARKER.encode() not in raw and message in json.loads(raw)["message"]
        )
    status, ok = post(mlflow_server, {"dataframe_records": [{"text": "a dog"}]})
    assert status == 200 and ok["predictions"][0]["text_embedding"]


def test_request_size_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_REQUEST_BYTES_ENV, raising=False)
    assert max_request_bytes() == DEFAULT_MAX_REQUEST_BYTES == 32 << 20
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "1000")
    assert max_request_bytes() == 1000
    for bad in ("0", "-5", "32MiB", "1e6"):
        monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=MAX_REQUEST_BYTES_ENV):
            max_request_bytes()


def test_serve_command_refuses_bad_settings(
    registered: Registered, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("MLFLOW_TRACKING_URI", MAX_REQUEST_BYTES_ENV, MODEL_PATH_ENV):
        monkeypatch.delenv(name, raising=False)  # run_serve sets them; restored afterwards
    uri = ["--tracking-uri", registered.uri]
    assert main(["serve", "-m", f"models:/{NAME}@champion", "--max-request-bytes", "0", *uri]) == 2
    assert "not a positive number of bytes" in capsys.readouterr().err
    assert main(["serve", "-m", f"models:/{NAME}@nope", *uri]) == 2
    assert "clipops serve: error:" in capsys.readouterr().err
