"""The promotion rule: when a candidate version takes the ``champion`` alias.

A promotion is a statistical claim, so the rule (:class:`PromotionRule`, configurable from
YAML/JSON or ``KEY=VALUE`` pairs) compares candidate and champion **on the same examples**:

- both versions' zero-shot per-example outcomes (:mod:`clip_eval.paired`: image content ids
  and 0/1 top-1) on the same suite are paired, and a stratified paired bootstrap gives the
  difference of ``primary_metric`` (``zero_shot/mean/top1``, or ``zero_shot/<dataset>/top1``)
  with a ``confidence`` interval;
- **promoted** only for a significant gain of at least the minimum effect: the interval's low
  end above 0 and the difference above ``min_improvement``, and no guarded metric (every
  per-dataset ``zero_shot/*`` and ``linear_probe/*`` metric the two share) down by more than
  ``max_regression``;
- **regressed** (flagged, tag ``clipops.promotion.regression``) for a significant loss: high
  end below 0 and the difference below ``-min_improvement``; **rejected** otherwise;
- **pending** when there is a champion but no paired evaluation of both (different suites,
  no per-example results): the nightly evaluation, which runs both on the model's suite,
  decides;
- with no champion yet, the candidate is promoted when ``promote_first`` (default true).

:func:`decide` is pure. :func:`apply_rule` gathers the evaluation records (fresh ones from the
caller, e.g. tonight's evaluation, else the versions' linked ``eval/results.jsonl``), moves
``champion`` when the rule says so and records the outcome and the interval on the candidate
version: tags ``clipops.promotion.decision`` / ``.reasons`` / ``.rule`` / ``.compared_to`` /
``.delta`` / ``.ci_low`` / ``.ci_high`` / ``.regression`` and a "Promotion decision" section
in its markdown description. Re-running it changes nothing: a candidate that already is the
champion is reported as such, and a rejected one is rejected again with the same reasons.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from clip_core.yamlio import load_yaml
from clip_eval.paired import PairedComparison, PairingError, paired_bootstrap, paired_outcomes

CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_TAG = "clipops.metric."
DECISION_TAG = "clipops.promotion.decision"
REASONS_TAG = "clipops.promotion.reasons"
RULE_TAG = "clipops.promotion.rule"
COMPARED_TAG = "clipops.promotion.compared_to"
REGRESSION_TAG = "clipops.promotion.regression"
INTERVAL_TAGS = ("clipops.promotion.delta", "clipops.promotion.ci_low", "clipops.promotion.ci_high")
SECTION = "## Promotion decision"
MAX_TAG_CHARS = 5000
#: Where a registered version's evaluation records live in its training run.
RESULTS_ARTIFACT = "eval/results.jsonl"
#: Error codes with which MLflow says "no such alias/model" (it answered).
_NOT_FOUND = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"})


class RuleError(ValueError):
    """A promotion rule is malformed (unknown key, wrong type, out of range)."""


def _number(rule: Any, key: str, low: float, high: float | None = None) -> float:
    value = getattr(rule, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleError(f"{key} must be a number, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" + ("" if high is None else f" and < {high}")
        raise RuleError(f"{key} must be {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate replaces the champion (see the module doc)."""

    primary_metric: str = "zero_shot/mean/top1"
    min_improvement: float = 0.005  # the minimum effect, as a fraction (0.5 points)
    max_regression: float = 0.01
    guarded_prefixes: tuple[str, ...] = ("zero_shot/", "linear_probe/")
    promote_first: bool = True
    confidence: float = 0.95
    resamples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        key = self.primary_metric
        parts = key.split("/") if isinstance(key, str) else []
        if len(parts) != 3 or parts[0] != "zero_shot" or parts[2] != "top1" or not parts[1]:
            raise RuleError(
                f"primary_metric must be zero_shot/mean/top1 or zero_shot/<dataset>/top1 (the "
                f"metrics with per-example results to pair), got {key!r}"
            )
        for name in ("min_improvement", "max_regression"):
            object.__setattr__(self, name, _number(self, name, 0.0))
        object.__setattr__(self, "confidence", _number(self, "confidence", 0.5, 1.0))
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int):
            raise RuleError(f"resamples must be an integer, got {self.resamples!r}")
        if self.resamples < 100:
            raise RuleError(f"resamples must be >= 100, got {self.resamples}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RuleError(f"seed must be an integer, got {self.seed!r}")
        prefixes = self.guarded_prefixes
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        if not all(isinstance(p, str) for p in prefixes):
            raise RuleError("guarded_prefixes must be a list of strings")
        object.__setattr__(self, "guarded_prefixes", tuple(prefixes))
        if not isinstance(self.promote_first, bool):
            raise RuleError(f"promote_first must be true or false, got {self.promote_first!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PromotionRule:
        """Build from a dict; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RuleError(f"unknown promotion rule keys {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_specs(cls, specs: list[str]) -> PromotionRule:
        """From CLI ``--rule`` values: YAML/JSON files and ``KEY=VALUE`` pairs, in order."""
        data: dict[str, Any] = {}
        for spec in specs:
            key, eq, value = spec.partition("=")
            if eq and "/" not in key and key.strip():
                data[key.strip()] = load_yaml(value)
                continue
            path = Path(spec)
            try:
                loaded = load_yaml(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise RuleError(
                    f"--rule {spec}: not KEY=VALUE nor a readable YAML file ({exc})"
                ) from exc
            if not isinstance(loaded, Mapping):
                raise RuleError(f"--rule {spec}: expected a mapping of rule keys")
            data.update(loaded)
        return cls.from_mapping(data)

    def to_json(self) -> str:
        """Compact JSON (stored as a tag)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def paired_dataset(self) -> str | None:
        """The one dataset the primary metric is about, ``None`` for the mean over all."""
        dataset = self.primary_metric.split("/")[1]
        return None if dataset == "mean" else dataset


OUTCOMES = ("promote", "reject", "regress", "pending")


@dataclass(frozen=True)
class Verdict:
    """What the rule says about one candidate against one champion (no side effects)."""

    outcome: str  # one of OUTCOMES
    reasons: tuple[str, ...]
    comparison: PairedComparison | None = None

    @property
    def promote(self) -> bool:
        """True when the rule promotes the candidate."""
        return self.outcome == "promote"


def _guarded(key: str, rule: PromotionRule) -> bool:
    return key.split("/")[1:2] != ["mean"] and key.startswith(rule.guarded_prefixes)


def _guard_reasons(
    candidate: Mapping[str, float], champion: Mapping[str, float], rule: PromotionRule
) -> list[str]:
    reasons = []
    for name in sorted(k for k in candidate.keys() & champion.keys() if _guarded(k, rule)):
        drop = champion[name] - candidate[name]
        if name != rule.primary_metric and drop > rule.max_regression:
            reasons.append(
                f"{name} regressed: {candidate[name]:.4f} vs champion {champion[name]:.4f} "
                f"(-{drop:.4f} > margin {rule.max_regression:.4f})"
            )
    return reasons


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    rule: PromotionRule,
    comparison: PairedComparison | None = None,
) -> Verdict:
    """Apply ``rule``: the versions' headline metrics (``None``: no champion) and the paired
    comparison of their per-example results (``None``: none could be made)."""
    if champion is None:
        first = rule.promote_first
        why = "the first candidate becomes champion" if first else "promote_first is false"
        return Verdict("promote" if first else "reject", (f"no champion yet: {why}",))
    key = rule.primary_metric
    if comparison is None:
        return Verdict(
            "pending",
            (
                f"{key}: no paired evaluation of candidate and champion on the same examples; "
                "the nightly evaluation (both on the model's suite) decides",
            ),
        )
    c, effect = comparison, rule.min_improvement
    line = f"{key}: candidate - champion {c.describe()}; minimum effect {100 * effect:.2f} points"
    if c.low > 0 and c.delta > effect:
        guards = _guard_reasons(candidate, champion, rule)
        if guards:
            return Verdict("reject", (line + ": significant gain", *guards), c)
        tail = f"no guarded metric regressed by more than {rule.max_regression:.4f}"
        return Verdict("promote", (line + ": significant gain", tail), c)
    if c.high < 0 and c.delta < -effect:
        return Verdict("regress", (line + ": significant regression",), c)
    return Verdict("reject", (line + ": no significant difference of that size",), c)


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`apply_rule` for one candidate version."""

    name: str
    candidate: str  # version
    champion_before: str | None
    champion_after: str | None
    outcome: str  # "promoted" | "rejected" | "regressed" | "pending" | "already_champion"
    reasons: tuple[str, ...]
    comparison: PairedComparison | None = None

    @property
    def promoted(self) -> bool:
        """True when the candidate is the champion after the decision."""
        return self.champion_after == self.candidate

    def markdown(self, rule: PromotionRule) -> str:
        """The decision as a markdown section."""
        before = f"v{self.champion_before}" if self.champion_before else "none"
        lines = [
            SECTION,
            "",
            f"**{self.outcome}**: `{self.name}` v{self.candidate} "
            f"(champion before: {before}, after: v{self.champion_after or '-'})",
            "",
            *[f"- {r}" for r in self.reasons],
            "",
            f"Rule: `{rule.to_json()}`",
            "",
        ]
        return "\n".join(lines)


def version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The ``clipops.metric.*`` tags of a version as floats."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG) :]] = float(value)
            except ValueError:
                continue
    return out


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version under ``alias``; ``None`` only when the server answered "no such alias"
    (an unreachable server raises)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise


def _replace_section(description: str | None, section: str) -> str:
    head = (description or "").split(SECTION)[0].rstrip()
    return (head + "\n\n" + section if head else section).strip() + "\n"


def stored_records(client: Any, name: str, version: str) -> list[dict[str, Any]] | None:
    """The evaluation records linked to the version's training run (``eval/results.jsonl``),
    ``None`` when it has none."""
    from mlflow.exceptions import MlflowException

    from clip_eval.report import read_jsonl

    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="clipops-promote-") as tmp:
        try:
            path = client.download_artifacts(run_id, RESULTS_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return None
        try:
            return read_jsonl(path)
        except (ValueError, OSError):
            return None


def compare_versions(
    candidate: Sequence[Mapping[str, Any]] | None,
    champion: Sequence[Mapping[str, Any]] | None,
    rule: PromotionRule,
) -> tuple[PairedComparison | None, str | None]:
    """The paired comparison of two versions' records, or why there is none."""
    if candidate is None or champion is None:
        who = "candidate" if candidate is None else "champion"
        return None, f"the {who} has no evaluation records"
    try:
        pairs = paired_outcomes(candidate, champion)
        only = rule.paired_dataset()
        if only is not None:
            pairs = {d: p for d, p in pairs.items() if _safe(d) == only}
            if not pairs:
                return None, f"no zero-shot dataset {only!r} in both evaluations"
        return paired_bootstrap(
            pairs, resamples=rule.resamples, confidence=rule.confidence, seed=rule.seed
        ), None
    except PairingError as exc:
        return None, str(exc)


def _safe(dataset: str) -> str:
    from clip_registry.metrics import mlflow_safe

    return mlflow_safe(dataset)


def apply_rule(
    name: str,
    *,
    version: str | int | None = None,
    rule: PromotionRule | None = None,
    records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    tracking_uri: str | None = None,
    client: Any = None,
) -> Decision:
    """Decide whether ``version`` (default: the ``candidate`` alias) becomes ``champion``.

    ``records`` maps version strings to fresh evaluation records (e.g. tonight's evaluation
    of the champion and the candidate on the model's suite); versions not in it use the
    records linked to their training run and their ``clipops.metric.*`` tags. Moves the
    ``champion`` alias when the rule says so and records the decision on the candidate
    version. Raises ``LookupError`` when there is no such version/alias, and
    ``TrackingUnreachableError`` (within seconds) when the tracking server does not answer.
    """
    from clip_registry.metrics import headline_metrics

    if client is None:
        from clip_train.tracking import tracking_client

        client = tracking_client(tracking_uri)
    rule = rule or PromotionRule()
    candidate = str(version) if version is not None else _alias_version(client, name, CANDIDATE)
    if candidate is None:
        raise LookupError(f"registered model {name!r} has no {CANDIDATE!r} alias")
    fresh = {str(k): list(v) for k, v in (records or {}).items()}

    def tags_of(v: str) -> Mapping[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(client.get_model_version(name, v).tags)  # also checks that it exists
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:
                raise
            raise LookupError(f"registered model {name!r} has no version {v}") from exc

    def evaluation(v: str) -> tuple[dict[str, float], Sequence[Mapping[str, Any]] | None]:
        tags = tags_of(v)
        if v in fresh:
            return headline_metrics(fresh[v]), fresh[v]
        return version_metrics(tags), stored_records(client, name, v)

    cand_metrics, cand_records = evaluation(candidate)
    champion = _alias_version(client, name, CHAMPION)
    after: str | None
    reasons: tuple[str, ...]
    comparison: PairedComparison | None = None
    if champion == candidate:
        outcome, reasons, after = "already_champion", (f"v{candidate} is the champion",), champion
    else:
        champ_metrics: dict[str, float] | None = None
        why: str | None = None
        if champion is not None:
            champ_metrics, champ_records = evaluation(champion)
            comparison, why = compare_versions(cand_records, champ_records, rule)
        verdict = decide(cand_metrics, champ_metrics, rule, comparison)
        if verdict.promote:
            client.set_registered_model_alias(name, CHAMPION, candidate)
        outcome = {"promote": "promoted", "reject": "rejected", "regress": "regressed"}.get(
            verdict.outcome, verdict.outcome
        )
        after = candidate if verdict.promote else champion
        reasons = verdict.reasons + ((f"not paired: {why}",) if why else ())
    decision = Decision(name, candidate, champion, after, outcome, reasons, comparison)
    _record(client, decision, rule)
    return decision


def _record(client: Any, decision: Decision, rule: PromotionRule) -> None:
    name, v = decision.name, decision.candidate
    tags = client.get_model_version(name, v).tags
    if decision.outcome == "already_champion" and DECISION_TAG in tags:
        return  # an existing champion keeps the record of the promotion that made it champion
    client.set_model_version_tag(name, v, DECISION_TAG, decision.outcome)
    client.set_model_version_tag(name, v, REASONS_TAG, "; ".join(decision.reasons)[:MAX_TAG_CHARS])
    client.set_model_version_tag(name, v, RULE_TAG, rule.to_json()[:MAX_TAG_CHARS])
    client.set_model_version_tag(name, v, COMPARED_TAG, decision.champion_before or "none")
    flagged = "true" if decision.outcome == "regressed" else "false"
    client.set_model_version_tag(name, v, REGRESSION_TAG, flagged)
    c = decision.comparison
    values = [f"{x:.6g}" for x in (c.delta, c.low, c.high)] if c else ["none"] * 3
    for tag, value in zip(INTERVAL_TAGS, values, strict=True):
        client.set_model_version_tag(name, v, tag, value)
    current = client.get_model_version(name, v).description
    client.update_model_version(
        name, v, description=_replace_section(current, decision.markdown(rule))
    )
