"""Reports of suite records: a markdown summary table, PNG plots, effective robustness.

Plots need matplotlib (not a declared dependency of the project); without it
:func:`write_plots` raises :class:`PlotsUnavailableError` and everything else still works.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed, so no plots can be drawn."""


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Records from a results JSONL file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Write records one JSON object a line; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), "utf-8")
    return p


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def headline(record: Record) -> str:
    """The one-line result of a record (main metric(s), percentages)."""
    m, task = record["metrics"], record["task"]
    if task == "zero_shot":
        e = m["ensembling"]
        return (
            f"top-1 {_pct(m['top1'])} (bare {_pct(e['bare_top1'])}, single "
            f"{_pct(e['single_top1'])}, chance {_pct(m['chance'])})"
        )
    if task == "linear_probe":
        return f"top-1 {_pct(m['top1'])} (C={m['C']:.3g}, {m['train_examples']} train)"
    if task == "few_shot":
        curve = ", ".join(f"{k}:{_pct(a)}" for k, a in zip(m["ks"], m["mean_top1"], strict=True))
        eff = m.get("effective_data_efficiency")
        extra = "" if "zero_shot_top1" not in m else f"; zero-shot {_pct(m['zero_shot_top1'])}"
        extra += "" if eff is None else f", matched at k={eff:.2f}"
        return f"top-1 by k {curve}{extra}"
    if task == "retrieval":
        keys = [k for k in m if "_R@" in k and not isinstance(m[k], dict)]
        return ", ".join(f"{k} {_pct(m[k])}" for k in keys)
    if task == "robustness":
        parts = [
            f"{kind}: id {_pct(v['id_top1'])} -> shift {_pct(v['shift_top1'])}"
            for kind, v in m.items()
            if isinstance(v, dict) and "id_top1" in v
        ]
        return "; ".join(parts)
    return json.dumps(m)[:120]


def chance_text(record: Record) -> str:
    """The chance level of a record's accuracies (percent): a random classifier over its
    classes, or a random ranking for retrieval recall."""
    m = record["metrics"]
    if record["task"] == "retrieval":
        chance = m.get("chance") or {}
        shown = {k.split("_R@")[1]: v for k, v in chance.items() if k.startswith("image_to")}
        other = {k.split("_R@")[1]: v for k, v in chance.items() if k.startswith("text_to")}
        text = ", ".join(f"R@{k} {_pct(v)}" for k, v in shown.items())
        if other and other != shown:
            text += "; text->image " + ", ".join(f"R@{k} {_pct(v)}" for k, v in other.items())
        return text or "-"
    classes = record.get("classnames") or []
    return _pct(1 / len(classes)) if classes else "-"


def summary_markdown(records: Sequence[Record]) -> str:
    """A markdown table: one row per record (model, dataset, task, result, chance, seconds)."""
    lines = [
        "| model | dataset | task | result (%) | chance (%) | seconds |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['task']} | {headline(r)} | "
            f"{chance_text(r)} | {r['timing']['seconds']:.1f} |"
        )
    models = sorted({(r["model"], r["checkpoint_sha256"][:12]) for r in records})
    notes = [f"- `{name}`: weights sha256 `{sha}...`" for name, sha in models]
    robust = effective_robustness_table(records)
    if robust:
        notes.append("")
        notes.append("Effective robustness (zero-shot, vs the trend of all models evaluated):")
        notes += [f"- {ds} / {model}: {100 * v:+.1f} points" for (ds, model), v in robust.items()]
    return "# Evaluation summary\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def effective_robustness_table(records: Sequence[Record]) -> dict[tuple[str, str], float]:
    """Per (dataset, model): zero-shot effective robustness across the models in ``records``.

    Needs robustness records of at least two models with different in-distribution
    accuracy on a dataset; datasets without that are left out.
    """
    from clip_core.robustness import effective_robustness

    by_dataset: dict[str, dict[str, tuple[float, float]]] = {}
    for r in records:
        zs = r["metrics"].get("zero_shot") if r["task"] == "robustness" else None
        if zs:
            by_dataset.setdefault(r["dataset"], {})[r["model"]] = (
                zs["id_top1"],
                zs["shift_top1"],
            )
    out: dict[tuple[str, str], float] = {}
    for ds, results in by_dataset.items():
        if len({iid for iid, _ in results.values()}) < 2:
            continue
        scores, _ = effective_robustness(results)
        out.update({(ds, model): value for model, value in scores.items()})
    return out


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailableError(
            "plots need matplotlib, which is not installed (pip install matplotlib); "
            "the JSONL results and summary.md are complete without it"
        ) from exc
    return plt


def _zs_vs_probe(plt: Any, records: Sequence[Record], path: Path) -> Path | None:
    zs = {
        (r["model"], r["dataset"]): r["metrics"]["top1"]
        for r in records
        if r["task"] == "zero_shot"
    }
    lp = {
        (r["model"], r["dataset"]): r["metrics"]["top1"]
        for r in records
        if r["task"] == "linear_probe"
    }
    both = sorted(set(zs) & set(lp))
    if not both:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="y = x")
    for key in both:
        ax.scatter(lp[key], zs[key], s=40)
        ax.annotate(key[1], (lp[key], zs[key]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="linear-probe top-1", ylabel="zero-shot top-1")
    ax.set_title("Zero-shot vs linear probe")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _few_shot(plt: Any, records: Sequence[Record], path: Path) -> Path | None:
    few = [r for r in records if r["task"] == "few_shot"]
    if not few:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in few:
        m = r["metrics"]
        line = ax.errorbar(
            m["ks"],
            m["mean_top1"],
            yerr=m["std_top1"],
            marker="o",
            capsize=3,
            label=f"{r['model']} / {r['dataset']}",
        )
        if "zero_shot_top1" in m:
            ax.axhline(m["zero_shot_top1"], ls="--", color=line[0].get_color(), label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="labelled examples per class (k)", ylabel="test top-1", ylim=(0, 1))
    ax.set_title("Few-shot linear probes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ensembling(plt: Any, records: Sequence[Record], path: Path) -> Path | None:
    zs = [r for r in records if r["task"] == "zero_shot"]
    if not zs:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(zs) + 2), 4))
    width = 0.25
    for j, kind in enumerate(("bare", "single", "ensemble")):
        xs = [i + (j - 1) * width for i in range(len(zs))]
        ys = [r["metrics"]["ensembling"][f"{kind}_top1"] for r in zs]
        ax.bar(xs, ys, width, label=kind)
    ax.set_xticks(range(len(zs)), [f"{r['dataset']}\n{r['model']}" for r in zs], fontsize=8)
    ax.set(ylabel="zero-shot top-1", ylim=(0, 1))
    ax.set_title("Prompt ensembling: bare name / default template / ensemble")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(records: Sequence[Record], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG plots for whichever record kinds are present; returns the files written.

    ``zeroshot_vs_linear_probe.png`` (with y = x), ``few_shot.png`` (curves with the
    zero-shot level), ``ensembling.png``. Raises :class:`PlotsUnavailableError` without
    matplotlib.
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _zs_vs_probe(plt, records, out / "zeroshot_vs_linear_probe.png"),
        _few_shot(plt, records, out / "few_shot.png"),
        _ensembling(plt, records, out / "ensembling.png"),
    ]
    return [p for p in made if p is not None]


def write_report(records: Sequence[Record], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``results.jsonl``, ``summary.md`` and the plots under ``out_dir``.

    Returns ``{"results", "summary", "plots", "plots_error"}`` (``plots_error`` is the
    message when matplotlib is missing, else ``None``).
    """
    out = Path(out_dir)
    results = write_jsonl(records, out / "results.jsonl")
    summary = out / "summary.md"
    summary.write_text(summary_markdown(records), encoding="utf-8")
    plots: list[Path] = []
    error = None
    try:
        plots = write_plots(records, out)
    except PlotsUnavailableError as exc:
        error = str(exc)
    return {"results": results, "summary": summary, "plots": plots, "plots_error": error}
