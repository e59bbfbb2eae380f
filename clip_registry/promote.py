"""The promotion rule: when a candidate version takes the ``champion`` alias.

The rule (:class:`PromotionRule`, configurable from YAML/JSON or ``KEY=VALUE`` pairs):

- the candidate's ``primary_metric`` (default ``zero_shot/mean/top1``) must beat the
  champion's by more than ``min_improvement`` (a tie keeps the champion);
- no guarded metric (default: every per-dataset ``zero_shot/*`` and ``linear_probe/*``
  metric the two versions share) may drop by more than ``max_regression``;
- with no champion yet, the candidate is promoted when ``promote_first`` (default true).

:func:`decide` is pure (metrics in, decision out). :func:`apply_rule` reads the aliases and
the versions' metric tags (or fresh metrics given by the caller, e.g. the nightly evaluation),
moves ``champion`` when the rule says so, and records the outcome on the candidate version:
tags ``clipops.promotion.decision`` / ``.reasons`` / ``.rule`` / ``.compared_to`` and a
"Promotion decision" section in its markdown description. Re-running it changes nothing: a
candidate that already is the champion is reported as such, and a rejected one is rejected
again with the same reasons.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from clip_core.yamlio import load_yaml

CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_TAG = "clipops.metric."
DECISION_TAG = "clipops.promotion.decision"
REASONS_TAG = "clipops.promotion.reasons"
RULE_TAG = "clipops.promotion.rule"
COMPARED_TAG = "clipops.promotion.compared_to"
SECTION = "## Promotion decision"
MAX_TAG_CHARS = 5000


class RuleError(ValueError):
    """A promotion rule is malformed (unknown key, wrong type, out of range)."""


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate replaces the champion (see the module doc)."""

    primary_metric: str = "zero_shot/mean/top1"
    min_improvement: float = 0.0
    max_regression: float = 0.01
    guarded_prefixes: tuple[str, ...] = ("zero_shot/", "linear_probe/")
    promote_first: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.primary_metric, str) or not self.primary_metric:
            raise RuleError("primary_metric must be a non-empty metric key")
        for key in ("min_improvement", "max_regression"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise RuleError(f"{key} must be a number >= 0, got {value!r}")
            object.__setattr__(self, key, float(value))
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


@dataclass(frozen=True)
class Verdict:
    """What the rule says about one candidate against one champion (no side effects)."""

    promote: bool
    reasons: tuple[str, ...]


def _guarded(key: str, rule: PromotionRule) -> bool:
    return key.split("/")[1:2] != ["mean"] and key.startswith(rule.guarded_prefixes)


def decide(
    candidate: Mapping[str, float], champion: Mapping[str, float] | None, rule: PromotionRule
) -> Verdict:
    """Apply ``rule`` to the candidate's and the champion's metrics (``None``: no champion)."""
    key = rule.primary_metric
    if champion is None:
        if rule.promote_first:
            return Verdict(True, ("no champion yet: the first candidate becomes champion",))
        return Verdict(False, ("no champion yet and promote_first is false",))
    if key not in candidate:
        return Verdict(False, (f"candidate has no {key} (evaluate it first)",))
    reasons: list[str] = []
    ok = True
    if key not in champion:
        reasons.append(f"{key}: champion has no value, candidate {candidate[key]:.4f}")
    else:
        delta = candidate[key] - champion[key]
        improved = delta > rule.min_improvement
        ok &= improved
        reasons.append(
            f"{key}: {candidate[key]:.4f} vs champion {champion[key]:.4f} ({delta:+.4f}; "
            f"needs > {rule.min_improvement:+.4f}): {'improved' if improved else 'not improved'}"
        )
    for name in sorted(k for k in candidate.keys() & champion.keys() if _guarded(k, rule)):
        if name == key:
            continue
        drop = champion[name] - candidate[name]
        if drop > rule.max_regression:
            ok = False
            reasons.append(
                f"{name} regressed: {candidate[name]:.4f} vs champion {champion[name]:.4f} "
                f"(-{drop:.4f} > margin {rule.max_regression:.4f})"
            )
    if ok:
        reasons.append(f"no guarded metric regressed by more than {rule.max_regression:.4f}")
    return Verdict(ok, tuple(reasons))


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`apply_rule` for one candidate version."""

    name: str
    candidate: str  # version
    champion_before: str | None
    champion_after: str | None
    outcome: str  # "promoted" | "rejected" | "already_champion"
    reasons: tuple[str, ...]

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
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _replace_section(description: str | None, section: str) -> str:
    head = (description or "").split(SECTION)[0].rstrip()
    return (head + "\n\n" + section if head else section).strip() + "\n"


def apply_rule(
    name: str,
    *,
    version: str | int | None = None,
    rule: PromotionRule | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    tracking_uri: str | None = None,
    client: Any = None,
) -> Decision:
    """Decide whether ``version`` (default: the ``candidate`` alias) becomes ``champion``.

    ``metrics`` maps version strings to fresh metrics (e.g. tonight's evaluation of the
    champion and the candidate); versions not in it use their ``clipops.metric.*`` tags.
    Moves the ``champion`` alias when the rule says so and records the decision on the
    candidate version. Raises ``LookupError`` when there is no such version/alias.
    """
    from clip_train.tracking import resolve_tracking_uri

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(resolve_tracking_uri(tracking_uri))
    rule = rule or PromotionRule()
    candidate = str(version) if version is not None else _alias_version(client, name, CANDIDATE)
    if candidate is None:
        raise LookupError(f"registered model {name!r} has no {CANDIDATE!r} alias")
    fresh = {str(k): dict(v) for k, v in (metrics or {}).items()}

    def metrics_of(v: str) -> dict[str, float]:
        from mlflow.exceptions import MlflowException

        try:
            tags = client.get_model_version(name, v).tags  # also checks that it exists
        except MlflowException as exc:
            raise LookupError(f"registered model {name!r} has no version {v}") from exc
        return fresh[v] if v in fresh else version_metrics(tags)

    cand_metrics = metrics_of(candidate)
    champion = _alias_version(client, name, CHAMPION)
    after: str | None
    reasons: tuple[str, ...]
    if champion == candidate:
        outcome, reasons, after = "already_champion", (f"v{candidate} is the champion",), champion
    else:
        verdict = decide(cand_metrics, None if champion is None else metrics_of(champion), rule)
        if verdict.promote:
            client.set_registered_model_alias(name, CHAMPION, candidate)
        outcome = "promoted" if verdict.promote else "rejected"
        after = candidate if verdict.promote else champion
        reasons = verdict.reasons
    decision = Decision(name, candidate, champion, after, outcome, reasons)
    _record(client, decision, rule)
    return decision


def apply_rule_to_records(
    name: str,
    version: str | int,
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    rule: PromotionRule | None = None,
    tracking_uri: str | None = None,
    client: Any = None,
) -> Decision:
    """:func:`apply_rule` with fresh evaluation records (``clipops eval`` / ``run_suite``
    output) per version string, e.g. ``{"7": champion_records, "9": candidate_records}``;
    the metric keys are those of :func:`clip_registry.metrics.headline_metrics`."""
    from clip_registry.metrics import headline_metrics

    fresh = {str(v): headline_metrics(recs) for v, recs in records.items()}
    return apply_rule(
        name, version=version, rule=rule, metrics=fresh, tracking_uri=tracking_uri, client=client
    )


def _record(client: Any, decision: Decision, rule: PromotionRule) -> None:
    name, v = decision.name, decision.candidate
    tags = client.get_model_version(name, v).tags
    if decision.outcome != "already_champion" or DECISION_TAG not in tags:
        # an existing champion keeps the record of the promotion that made it champion
        client.set_model_version_tag(name, v, DECISION_TAG, decision.outcome)
        client.set_model_version_tag(
            name, v, REASONS_TAG, "; ".join(decision.reasons)[:MAX_TAG_CHARS]
        )
        client.set_model_version_tag(name, v, RULE_TAG, rule.to_json()[:MAX_TAG_CHARS])
        client.set_model_version_tag(name, v, COMPARED_TAG, decision.champion_before or "none")
        current = client.get_model_version(name, v).description
        client.update_model_version(
            name, v, description=_replace_section(current, decision.markdown(rule))
        )
