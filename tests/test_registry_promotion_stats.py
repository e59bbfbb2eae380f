"""The promotion rule on real evaluations: noise is not promoted, real gains and losses are seen.

Two tiny CLIPs (a random one, and one whose projections were fitted to colour prompts:
test_registry_support) are evaluated by ``clip_eval.suite.run_suite`` on one suite, a CSV
table of noisy colour PNGs. The table is rewritten in another row order between two
evaluations of the same checkpoint, so the pairing has to follow the images, not positions.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import pytest
from test_registry_support import (
    COLOUR_NAMES,
    COLOUR_TEMPLATE,
    colour_checkpoint,
    colour_png,
    random_checkpoint,
)

from clip_eval.suite import parse_suite, run_suite
from clip_registry.metrics import headline_metrics
from clip_registry.promote import PromotionRule, compare_versions, decide

pytestmark = pytest.mark.usefixtures("torch_single_thread")
PER_COLOUR = 30


def _write_table(folder: Path, seed: int) -> Path:
    """``colours.csv`` (image path, label) over the same PNGs, rows shuffled by ``seed``."""
    rows = []
    for colour in COLOUR_NAMES:
        for s in range(PER_COLOUR):
            name = f"{colour}-{s}.png"
            if not (folder / name).exists():
                (folder / name).write_bytes(colour_png(colour, 5000 + s))
            rows.append({"image": name, "label": colour})
    random.Random(seed).shuffle(rows)
    path = folder / "colours.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("promotion")
    table = _write_table(root, seed=0)
    suite = parse_suite(
        {
            "name": "colours",
            "tasks": [
                {
                    "dataset": str(table),
                    "task": "zero_shot",
                    "options": {"templates": [COLOUR_TEMPLATE]},
                }
            ],
        }
    )
    colour, rand = colour_checkpoint(root / "colour"), random_checkpoint(root / "random", seed=3)
    out = {"colour": run_suite(colour, suite), "random": run_suite(rand, suite)}
    _write_table(root, seed=1)  # the same images, another order
    out["colour-again"] = run_suite(colour, suite)
    return out


def _decide(cand: list[dict[str, Any]], champ: list[dict[str, Any]]) -> tuple[str, Any]:
    rule = PromotionRule()
    comparison, why = compare_versions(cand, champ, rule)
    assert comparison is not None, why
    verdict = decide(headline_metrics(cand), headline_metrics(champ), rule, comparison)
    return verdict.outcome, comparison


def test_the_same_checkpoint_twice_is_neither_promoted_nor_flagged(
    evaluations: dict[str, list[dict[str, Any]]],
) -> None:
    first, again = evaluations["colour"], evaluations["colour-again"]
    assert first[0]["per_example"]["ids"] != again[0]["per_example"]["ids"]  # order differs
    outcome, c = _decide(again, first)
    assert outcome == "reject" and c.delta == 0.0 and c.examples == PER_COLOUR * len(COLOUR_NAMES)


def test_a_clearly_better_checkpoint_is_promoted(
    evaluations: dict[str, list[dict[str, Any]]],
) -> None:
    cand, champ = evaluations["colour"], evaluations["random"]
    assert cand[0]["metrics"]["top1"] > champ[0]["metrics"]["top1"] + 0.3
    outcome, c = _decide(cand, champ)
    assert outcome == "promote" and c.low > 0.2, c


def test_a_clearly_worse_checkpoint_is_not_promoted_and_is_flagged(
    evaluations: dict[str, list[dict[str, Any]]],
) -> None:
    outcome, c = _decide(evaluations["random"], evaluations["colour"])
    assert outcome == "regress" and c.high < -0.2, c
