"""Zero-shot classification: prompt-ensembled text classifiers and their metrics.

Pure functions (tensors in, metrics out): no files, no logging. A classifier is the
``[C, D]`` matrix of L2-normalised, prompt-ensembled class embeddings; logits are
``normalise(image_embedding) @ classifier.T`` (optionally times a temperature, which does not
change any of the metrics here).

Templates: :data:`DEFAULT_TEMPLATE` is the paper's single default prompt;
:data:`IMAGENET_TEMPLATES` is the short ImageNet ensemble from OpenAI's prompt-engineering
notebook (7 templates, chosen by the paper's authors from the 80 as the best subset);
:data:`DATASET_TEMPLATES` gives per-dataset examples in the style of the paper (e.g.
``"a photo of a {}, a type of pet."``). :func:`templates_for` picks the per-dataset list when
one exists and the ImageNet short list otherwise.

Devices: :func:`build_classifier` passes ``tokenize``'s output straight to ``encode_text``;
for a model on an accelerator pass a ``tokenize`` that moves the tokens there, e.g.
``lambda texts: tokenizer(texts).to(device)``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_TEMPLATES: tuple[str, ...] = (DEFAULT_TEMPLATE,)
BARE_TEMPLATE = "{}"

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

DATASET_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "food101": ("a photo of {}, a type of food.",),
    "flowers102": ("a photo of a {}, a type of flower.",),
    "fgvc_aircraft": (
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}."),
    "mnist": ('a photo of the number: "{}".',),
    "fashion_mnist": (
        "a photo of a {}.",
        "a photo of the {}, a type of clothing.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
    ),
    "digits": ('a photo of the number: "{}".', "a low resolution photo of the digit {}."),
    "synthetic_shape": ("a {}.", "a picture of a {}.", "a {} on a background."),
    "synthetic_colour": ("a {} shape.", "a photo of something {}.", "{} objects."),
}


def templates_for(dataset: str | None) -> tuple[str, ...]:
    """The documented templates for ``dataset``; :data:`IMAGENET_TEMPLATES` when unknown."""
    if dataset is not None and dataset in DATASET_TEMPLATES:
        return DATASET_TEMPLATES[dataset]
    return IMAGENET_TEMPLATES


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """Class weights [C, D]: per class, normalise each prompt's embedding, average, renormalise."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}': {bad}")
    weights = []
    for name in classnames:
        tokens = tokenize([t.format(name) for t in templates])  # [T, L]
        emb = F.normalize(encode_text(tokens), dim=-1)  # [T, D]
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))  # [D]
    return torch.stack(weights)  # [C, D]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits; logits [N, C], labels [N]."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=-1).indices  # [N, k]
    return (top == labels[:, None]).any(dim=-1).float().mean().item()


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall averaged over the classes present in ``labels``."""
    pred = logits.argmax(dim=-1)  # [N]
    recalls = [(pred[labels == c] == c).float().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``top1``, ``top5`` (only with >= 5 classes) and ``mean_per_class_recall``.

    logits [N, C], labels [N].
    """
    metrics = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        metrics["top5"] = topk_accuracy(logits, labels, 5)
    metrics["mean_per_class_recall"] = mean_per_class_recall(logits, labels)
    return metrics


class ImageEncoder(Protocol):
    """Anything with CLIP's ``encode_image`` (images [B, 3, R, R] -> embeddings [B, D])."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings."""
        ...


@torch.no_grad()
def zero_shot_logits(
    model: ImageEncoder,
    images: Iterable[torch.Tensor],
    classifier: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Logits [N, C] for image batches, one batch in memory at a time.

    ``images`` yields batches [B, 3, R, R] (a DataLoader, a generator); each is moved to the
    classifier's device, encoded, L2-normalised and multiplied by ``classifier.T`` (and by
    ``logit_scale``); only the [B, C] logits are kept (on CPU), so peak memory is one batch
    plus N x C floats. ``on_batch`` is called with each batch size (for a progress bar). The
    model is put in eval mode for the call and its previous mode restored afterwards.
    """
    was_training = bool(getattr(model, "training", False))
    set_mode = getattr(model, "train", None)
    if callable(set_mode):
        set_mode(False)
    try:
        chunks = []
        weights = classifier.T  # [D, C]
        for batch in images:
            feats = model.encode_image(batch.to(classifier.device))  # [B, D]
            feats = F.normalize(feats.to(classifier.dtype), dim=-1)  # [B, D]
            chunks.append((logit_scale * feats @ weights).cpu())  # [B, C]
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        if callable(set_mode):
            set_mode(was_training)
    if not chunks:
        return torch.empty(0, classifier.shape[0])
    return torch.cat(chunks)  # [N, C]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, values): a cache key.

    Reads every parameter once (about a second for ViT-B/32 on CPU); callers that already
    know a checkpoint hash should use that instead.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


CacheKey = tuple[str, tuple[str, ...], tuple[str, ...]]


class ClassifierCache:
    """In-memory LRU of zero-shot classifiers keyed by (model key, classnames, templates).

    The model key identifies the weights and is supplied by the caller (a checkpoint hash, or
    :func:`weights_fingerprint`); the cache never inspects the model itself.
    """

    def __init__(self, maxsize: int = 32) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def get_or_build(
        self,
        model_key: str,
        encode_text: Callable[[torch.Tensor], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        *,
        classnames: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> torch.Tensor:
        """The cached classifier [C, D], building it with :func:`build_classifier` on a miss."""
        key: CacheKey = (model_key, tuple(classnames), tuple(templates))
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key]
        self.misses += 1
        weights = build_classifier(encode_text, tokenize, classnames, templates)  # [C, D]
        self._store[key] = weights
        if len(self._store) > self.maxsize:
            self._store.popitem(last=False)
        return weights

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._store.clear()
        self.hits = self.misses = 0


@dataclass(frozen=True)
class EnsemblingGain:
    """Metrics with bare class names, the single default template and the full ensemble."""

    bare: dict[str, float]
    single: dict[str, float]
    ensemble: dict[str, float]

    def gain(self, metric: str = "top1") -> dict[str, float]:
        """Ensemble minus bare and ensemble minus single, for ``metric``."""
        return {
            "ensemble_vs_bare": self.ensemble[metric] - self.bare[metric],
            "ensemble_vs_single": self.ensemble[metric] - self.single[metric],
        }


def ensembling_gain(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    image_embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    classnames: Sequence[str],
    templates: Sequence[str],
    default_template: str = DEFAULT_TEMPLATE,
) -> EnsemblingGain:
    """Zero-shot metrics for three classifiers on the same precomputed image embeddings.

    ``bare`` uses the class name alone (template ``"{}"``), ``single`` the default template,
    ``ensemble`` all of ``templates``. image_embeddings [N, D] (normalised here), labels [N].
    """
    feats = F.normalize(image_embeddings, dim=-1)  # [N, D]
    results = {}
    for name, temps in (
        ("bare", (BARE_TEMPLATE,)),
        ("single", (default_template,)),
        ("ensemble", tuple(templates)),
    ):
        weights = build_classifier(encode_text, tokenize, classnames, temps)  # [C, D]
        weights = weights.to(device=feats.device, dtype=feats.dtype)
        results[name] = classification_metrics(feats @ weights.T, labels)  # logits [N, C]
    return EnsemblingGain(**results)
