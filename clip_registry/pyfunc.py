"""The served CLIP: an ``mlflow.pyfunc.PythonModel`` over a clip_core checkpoint.

The model is logged as "models from code" (``clip_registry/model_code.py``), so nothing is
pickled: its only artifact is the checkpoint directory (``model.safetensors``, ``clip.json``,
``bpe_merges.txt.gz``), read back with :func:`clip_core.checkpoint.load_checkpoint`.

Input (see :mod:`clip_registry.request`): a table with an ``image`` column (base64 string or
raw bytes) and/or a ``text`` column; params ``task`` (``embed`` | ``zero_shot``), ``labels``,
``templates``. Output, one row per input row:

- ``embed``: ``image_embedding`` and ``text_embedding`` (L2-normalised lists of floats, or
  null where the row had no image / text);
- ``zero_shot``: ``label`` (the most probable class), ``score`` (its probability) and
  ``probabilities`` (softmax over ``labels``, in the order given, at the model's learned
  temperature).

Malformed input raises ``MlflowException`` with error code ``INVALID_PARAMETER_VALUE`` (HTTP
400). Served, the client gets only the error's data-free ``public`` reason, and request bodies
are capped in size (:mod:`clip_registry.serving`, whose guard ``load_context`` installs in
MLflow's own scoring server too).

The model runs on ``$CLIPOPS_SERVE_DEVICE`` (default ``cpu``; e.g. ``cuda`` on a GPU host).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from mlflow.pyfunc import PythonModel

from clip_core.checkpoint import load_checkpoint
from clip_core.images import ImageTooLargeError
from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform, decode_image
from clip_core.zeroshot import build_classifier
from clip_registry.device import serving_device
from clip_registry.request import ClipRequest, RequestError, parse_request
from clip_registry.serving import install_in_mlflow_scoring_server, report_request_error

CHECKPOINT_ARTIFACT = "checkpoint"
BATCH = 64


class ClipEmbedder:
    """Embeddings and zero-shot predictions of one loaded checkpoint (no MLflow involved)."""

    def __init__(self, model: CLIP, tokenizer: ClipTokenizer, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.transform = EvalTransform(model.image_size)

    @classmethod
    def from_checkpoint(cls, directory: str, device: str = "cpu") -> ClipEmbedder:
        """Load a clip_core checkpoint directory (it must include its tokenizer)."""
        loaded = load_checkpoint(directory)
        if loaded.tokenizer is None:
            raise ValueError(f"checkpoint {directory} has no tokenizer; it cannot be served")
        return cls(loaded.model, loaded.tokenizer, device)

    @torch.no_grad()
    def embed_images(
        self, images: Sequence[bytes], rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Encoded images -> normalised embeddings [N, D].

        An undecodable image raises RequestError naming its row (``rows[i]``, default ``i``).
        """
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(self.transform(decode_image(data)))  # [3, R, R]
            except Exception as exc:  # PIL raises many types for undecodable bytes
                row = i if rows is None else rows[i]
                public = f"row {row}: column 'image' is not a decodable image"
                if isinstance(exc, ImageTooLargeError):
                    public = f"row {row}: column 'image' declares too many pixels"
                raise RequestError(f"{public} ({exc})", public) from exc
        out = [
            F.normalize(
                self.model.encode_image(torch.stack(pixels[s : s + BATCH]).to(self.device)), dim=-1
            ).cpu()
            for s in range(0, len(pixels), BATCH)
        ]  # [b, D] each
        return torch.cat(out)  # [N, D]

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        """Token ids [B, L] on the model's device (texts longer than the context are cut)."""
        return self.tokenizer(texts, truncate=True).to(self.device)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> normalised embeddings [N, D] (texts longer than the context are cut)."""
        out = [
            F.normalize(
                self.model.encode_text(self._tokens(list(texts[s : s + BATCH]))), dim=-1
            ).cpu()
            for s in range(0, len(texts), BATCH)
        ]  # [b, D] each
        return torch.cat(out)  # [N, D]

    @torch.no_grad()
    def zero_shot(
        self, images: Sequence[bytes], labels: Sequence[str], templates: Sequence[str]
    ) -> torch.Tensor:
        """Class probabilities [N, C] over ``labels`` (prompt-ensembled classifier)."""
        feats = self.embed_images(images)  # [N, D]

        weights = build_classifier(self.model.encode_text, self._tokens, labels, templates)
        scale = self.model.logit_scale.exp().cpu()
        logits = scale * feats @ weights.cpu().T  # [N, C]
        return logits.softmax(dim=-1)

    def predict(self, request: ClipRequest) -> list[dict[str, Any]]:
        """One output record per input row (see the module doc)."""
        if request.task == "zero_shot":
            probs = self.zero_shot(
                [b for b in request.images if b is not None], request.labels, request.templates
            )  # [N, C]
            top = probs.argmax(dim=-1)  # [N]
            return [
                {
                    "label": request.labels[int(k)],
                    "score": float(p[k]),
                    "probabilities": [float(x) for x in p],
                }
                for p, k in zip(probs, top, strict=True)
            ]
        return _embed_records(self, request)


def _embed_records(embedder: ClipEmbedder, request: ClipRequest) -> list[dict[str, Any]]:
    images = [(i, b) for i, b in enumerate(request.images) if b is not None]
    texts = [(i, t) for i, t in enumerate(request.texts) if t is not None]
    records: list[dict[str, Any]] = [
        {"image_embedding": None, "text_embedding": None} for _ in range(request.rows)
    ]
    if images:
        emb = embedder.embed_images([b for _, b in images], [i for i, _ in images])  # [n, D]
        for (i, _), row in zip(images, emb.tolist(), strict=True):
            records[i]["image_embedding"] = row
    if texts:
        emb = embedder.embed_texts([t for _, t in texts])  # [n, D]
        for (i, _), row in zip(texts, emb.tolist(), strict=True):
            records[i]["text_embedding"] = row
    return records


def _columns(model_input: Any) -> dict[str, list[Any]]:
    """A DataFrame, a dict of columns or a list of row dicts -> column name -> cells."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return {str(c): list(model_input[c]) for c in model_input.columns}
    if isinstance(model_input, dict):
        return {
            str(k): list(v) if isinstance(v, list | tuple) else [v] for k, v in model_input.items()
        }
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        keys = sorted({str(k) for r in model_input for k in r})
        return {k: [r.get(k) for r in model_input] for k in keys}
    raise RequestError(
        f"input must be a table with 'image'/'text' columns, got {type(model_input).__name__}"
    )


class ClipPyfuncModel(PythonModel):
    """MLflow pyfunc wrapper of :class:`ClipEmbedder`; artifact ``checkpoint`` is the model."""

    def __init__(self) -> None:
        self.embedder: ClipEmbedder | None = None

    def load_context(self, context: Any) -> None:
        """Load the checkpoint directory logged as artifact ``checkpoint``.

        Loaded by MLflow's scoring server (``mlflow models serve``), it also puts the request
        guard in front of that server (:func:`install_in_mlflow_scoring_server`).
        """
        install_in_mlflow_scoring_server()
        self.embedder = ClipEmbedder.from_checkpoint(
            context.artifacts[CHECKPOINT_ARTIFACT], serving_device()
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Embed or classify ``model_input``; malformed input -> MlflowException (HTTP 400).

        ``model_input`` is a DataFrame when called through MLflow (a dict of columns or a list
        of row dicts also works when calling this object directly).
        """
        from mlflow.exceptions import MlflowException

        if self.embedder is None:
            self.load_context(context)
        assert self.embedder is not None
        try:
            request = parse_request(_columns(model_input), params)
            records = self.embedder.predict(request)
        except RequestError as exc:
            report_request_error(exc.public)  # what a client of the served model gets
            raise MlflowException.invalid_parameter_value(f"clipops: {exc}") from exc
        return pd.DataFrame.from_records(records)
