"""Log a clip_core checkpoint as an MLflow pyfunc model ("models from code", no pickle).

The logged model's files are ``MLmodel``, ``model_code.py`` (the script from
:mod:`clip_registry.model_code`), ``artifacts/checkpoint/`` (``model.safetensors``,
``clip.json``, ``bpe_merges.txt.gz``), the input example and environment files. Loading it
needs clipops installed (``pip_requirements`` says so) and nothing else from the run.
"""

from __future__ import annotations

import base64
import io
from importlib import metadata
from pathlib import Path
from typing import Any

from clip_registry.pyfunc import CHECKPOINT_ARTIFACT

MODEL_CODE = Path(__file__).with_name("model_code.py")
LOGGED_MODEL_NAME = "clip"


def signature() -> Any:
    """The declared signature: optional ``image``/``text`` string columns, params, outputs."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema(
        [
            ColSpec(DataType.string, "image", required=False),  # base64 (JSON) or bytes
            ColSpec(DataType.string, "text", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(DataType.double), "image_embedding", required=False),
            ColSpec(Array(DataType.double), "text_embedding", required=False),
            ColSpec(DataType.string, "label", required=False),
            ColSpec(DataType.double, "score", required=False),
            ColSpec(Array(DataType.double), "probabilities", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("task", DataType.string, "embed"),
            ParamSpec("labels", DataType.string, [], shape=(-1,)),
            ParamSpec("templates", DataType.string, ["a photo of a {}."], shape=(-1,)),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_png(size: int = 32) -> bytes:
    """A small deterministic PNG (a red square on grey) for the input example."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (190, 190, 190))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], "red")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def input_example() -> Any:
    """One row with a base64 PNG and a caption (the JSON form a client sends)."""
    import pandas as pd  # type: ignore[import-untyped]

    png = base64.b64encode(example_png()).decode("ascii")
    return pd.DataFrame({"image": [png], "text": ["a red square."]})


def pip_requirements() -> list[str]:
    """What the model needs at load time: clipops (which brings torch, safetensors, ...)."""
    reqs = []
    for dist in ("clipops", "mlflow", "torch"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_clip_model(run_id: str, checkpoint_dir: str | Path, tracking_uri: str) -> Any:
    """Log ``checkpoint_dir`` as a pyfunc model of run ``run_id``; returns MLflow's ModelInfo."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=LOGGED_MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
                signature=signature(),
                input_example=input_example(),
                pip_requirements=pip_requirements(),
            )
    finally:
        mlflow.set_tracking_uri(previous)
    return info
