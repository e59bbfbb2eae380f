"""Zero-shot classification: prompt-ensembled text classifiers and their metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


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
