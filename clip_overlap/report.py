"""Files of an overlap analysis: JSON report, markdown table, plots, matched pairs, contact sheet.

* ``overlap.json``: the report dict of :func:`clip_overlap.pipeline.run_overlap`;
* ``overlap.md``: one table row per dataset;
* ``overlap.png``: the paper's figure 17 style: accuracy difference vs detected overlap per
  dataset (left Overlap - Clean, right All - Clean with the 99.5% interval of Clean),
  significance after Bonferroni marked by the marker;
* ``pr_curve.json`` / ``pr_curve.png``: each dataset's precision/recall curve with the
  chosen threshold;
* ``matches.jsonl``: every flagged pair, every unverified candidate (above the threshold of
  a detection that may not count it, :mod:`clip_overlap.status`) and the best other ones per
  dataset, with similarities and the pretraining row's key;
* ``contact_sheet.png``: the top matches side by side, for checking by eye.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from clip_overlap.calibrate import Calibration
from clip_overlap.embed import to_pil

if TYPE_CHECKING:
    from clip_overlap.pipeline import OverlapConfig, _Target

Details = dict[str, tuple[Calibration, np.ndarray, np.ndarray, np.ndarray]]
_TILE = 96


def write_json(path: Path, value: Any) -> Path:
    """Pretty JSON (infinities as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(value), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The markdown table of a report (percentages; p-values raw and Bonferroni-corrected)."""
    lines = [
        f"# Data overlap: {report['model']} vs {report['train']}",
        "",
        f"Embedding `{report['embedding']['kind']}`, search `{report['search']['kind']}` over "
        f"{report['n_train']} pretraining images; threshold for precision >= "
        f"{report['min_precision']}. Status: **{report.get('status', '-')}**.",
        "",
        "| dataset | status | N | overlap | contamination % | unverified candidates | All % | "
        "Clean % | Overlap % | All - Clean | p | p (Bonf.) | Clean 99.5% CI | threshold | "
        "precision | recall | calibration |",
        "|" + " --- |" * 17,
    ]
    for label, r in report["datasets"].items():
        ci = r["clean_ci_99_5"]
        ci_text = "-" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"
        lines.append(
            f"| {label} | {r.get('status', '-')} | {r['n_all']} | {r['n_overlap']} | "
            f"{_pct(r['contamination'])} | {r.get('unverified_candidates', 0)} | "
            f"{_pct(r['acc_all'])} | {_pct(r['acc_clean'])} | {_pct(r['acc_overlap'])} | "
            f"{_pct(r['all_minus_clean'], True)} | {_p(r['p_value'])} | "
            f"{_p(r['p_value_bonferroni'])} | {ci_text} | {r['threshold']:.4f} | "
            f"{_pct(r['precision'])} | {_pct(r['recall'])} | {r['calibration']} |"
        )
    s = report["summary"]
    lines += [
        "",
        f"{s['with_overlap']} of {s['datasets']} datasets have detected overlap; median "
        f"contamination {_pct(s['median_contamination'])}%, mean "
        f"{_pct(s['mean_contamination'])}%; significant after Bonferroni (p < 0.05): "
        f"{', '.join(s['significant_after_bonferroni']) or 'none'}.",
        "",
    ]
    unverified = s.get("unverified_datasets") or []
    if unverified:
        lines += [
            f"Unverified ({', '.join(unverified)}): no calibrated detector (no verification, no "
            "planted copies reaching the target precision), so only exact duplicates count as "
            "overlap; the candidates above the threshold are listed in `matches.jsonl` as "
            "`unverified_candidate` and are **not** contamination. Verify them (`--detector` "
            "with verification) or calibrate on planted copies to measure contamination.",
            "",
        ]
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overlap(report: dict[str, Any], path: Path) -> Path:
    """Accuracy difference (percentage points) vs detected overlap (%) per dataset."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "overlap_minus_clean", "Overlap - Clean"),
        (axes[1], "all_minus_clean", "All - Clean"),
    ):
        for label, r in report["datasets"].items():
            if r[key] is None:
                continue
            x, y = 100 * (r["contamination"] or 0.0), 100 * r[key]
            p = r["p_value_bonferroni"]
            marker, colour = ("*", "tab:red") if p is not None and p < 0.05 else ("o", "tab:blue")
            yerr = None
            if key == "all_minus_clean" and r["clean_ci_99_5"] is not None:
                low, high = r["clean_ci_99_5"]
                clean = r["acc_clean"]
                yerr = [[100 * max(high - clean, 0.0)], [100 * max(clean - low, 0.0)]]
            ax.errorbar([x], [y], yerr=yerr, fmt=marker, color=colour, ms=9, capsize=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("detected data overlap (%)")
        ax.set_ylabel(f"difference in zero-shot accuracy, {title} (points)")
        ax.set_title(f"{title}  (* significant after Bonferroni)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_pr_curves(details: Details, out: Path) -> tuple[Path, Path]:
    """``pr_curve.json`` (thresholds, precision, recall per dataset) and ``pr_curve.png``."""
    curves = {
        label: {
            "mode": cal.mode,
            "chosen_threshold": cal.threshold,
            "thresholds": [float(x) for x in cal.curve.thresholds],
            "precision": [float(x) for x in cal.curve.precision],
            "recall": [float(x) for x in cal.curve.recall],
            "positives": cal.curve.positives,
            "negatives": cal.curve.negatives,
        }
        for label, (cal, _, _, _) in details.items()
    }
    json_path = write_json(out / "pr_curve.json", curves)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (cal, _, _, _) in details.items():
        ax.plot(cal.curve.recall, cal.curve.precision, label=f"{label} ({cal.mode})")
        if cal.recall is not None and cal.precision is not None:
            ax.plot([cal.recall], [cal.precision], "k*", ms=10)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("duplicate detection (* = chosen threshold)")
    fig.tight_layout()
    png = out / "pr_curve.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return json_path, png


def _pairs(
    targets: Sequence[_Target], details: Details, rows: dict[int, tuple[str, bytes]], extra: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in targets:
        cal, scores, ids, overlap = details[t.label]
        candidate = ~overlap & (scores >= cal.threshold)  # [N] above it, but not counted
        order = np.argsort(-scores, kind="stable")
        unflagged = [int(i) for i in order if not overlap[i] and not candidate[i]][:extra]
        listed = [int(i) for i in order if overlap[i] or candidate[i]] + unflagged
        for i in listed:
            row = rows.get(int(ids[i]))
            label = t.dataset.test.labels[i]
            out.append(
                {
                    "dataset": t.label,
                    "index": i,
                    "class": t.dataset.classnames[label] if label >= 0 else None,
                    "similarity": float(scores[i]),
                    "overlap": bool(overlap[i]),
                    "unverified_candidate": bool(candidate[i]),
                    "train_id": int(ids[i]),
                    "train_key": None if row is None else row[0],
                }
            )
    return out


def contact_sheet(
    pairs: list[dict[str, Any]],
    targets: Sequence[_Target],
    rows: dict[int, tuple[str, bytes]],
    path: Path,
    limit: int,
) -> Path:
    """A grid of (evaluation image | pretraining match) tiles with similarity captions."""
    by_label = {t.label: t for t in targets}
    shown = sorted(pairs, key=lambda p: (not p["overlap"], -p["similarity"]))[:limit]
    cols = 3
    cell_w, cell_h = 2 * _TILE + 8, _TILE + 28
    nrows = max(1, math.ceil(len(shown) / cols))
    sheet = Image.new("RGB", (cols * cell_w, nrows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, pair in enumerate(shown):
        x, y = (n % cols) * cell_w, (n // cols) * cell_h
        query = to_pil(by_label[pair["dataset"]].dataset.test.images[pair["index"]])
        sheet.paste(query.convert("RGB").resize((_TILE, _TILE)), (x, y))
        row = rows.get(pair["train_id"])
        if row is not None:
            sheet.paste(to_pil(row[1]).convert("RGB").resize((_TILE, _TILE)), (x + _TILE + 2, y))
        flag = "DUP" if pair["overlap"] else "unverified" if pair["unverified_candidate"] else "no"
        text = f"{pair['dataset'][:18]}#{pair['index']} {pair['similarity']:.3f} {flag}"
        draw.text((x + 2, y + _TILE + 4), text, fill="red" if pair["overlap"] else "black")
    sheet.save(path)
    return path


def write_outputs(
    out: Path,
    report: dict[str, Any],
    targets: Sequence[_Target],
    details: Details,
    *,
    rows: dict[int, tuple[str, bytes]],
    config: OverlapConfig,
) -> dict[str, str]:
    """Write every file into ``out``; records their names under ``report["files"]``."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = _pairs(targets, details, rows, config.listed_unflagged)
    with (out / "matches.jsonl").open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair, sort_keys=True) + "\n")
    pr_json, pr_png = write_pr_curves(details, out)
    files = {
        "report": "overlap.json",
        "table": (out / "overlap.md").name,
        "plot": plot_overlap(report, out / "overlap.png").name,
        "pr_curve": pr_json.name,
        "pr_curve_plot": pr_png.name,
        "matches": "matches.jsonl",
        "contact_sheet": contact_sheet(
            pairs, targets, rows, out / "contact_sheet.png", config.sheet_pairs
        ).name,
    }
    report["files"] = files
    (out / "overlap.md").write_text(markdown(report), encoding="utf-8")
    return files
