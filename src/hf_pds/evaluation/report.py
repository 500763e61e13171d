"""Aggregate student runs into a Markdown table, a JSON file and a recall-vs-budget plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .student import METRIC_KEYS, StudentRun

RECALL_KEYS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10")
TABLE_KEYS = ("rsum", *RECALL_KEYS)
LABELS = {"rsum": "rsum", "ir1": "IR@1", "ir5": "IR@5", "ir10": "IR@10", "tr1": "TR@1", "tr5": "TR@5", "tr10": "TR@10"}
REPORT_FILES = {"markdown": "results.md", "json": "results.json", "plot": "recall_vs_budget.png"}


def summarize(runs: Sequence[StudentRun | dict], which: str = "test") -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single run) over runs of each metric of
    ``which`` (``"test"``, ``"validation"`` or ``"test_selected"``): ``{"ir1": {"mean", "std", "n"}, ...}``."""
    if not runs:
        raise ValueError("no runs to summarise.")
    records = [run.to_dict() if isinstance(run, StudentRun) else run for run in runs]
    if which == "test_selected":
        if any(record.get("test_selected") is None for record in records):
            raise ValueError("test-selected figures were not computed (report_test_selected=False).")
        values = [record["test_selected"]["metrics"] for record in records]
    elif which in ("test", "validation"):
        values = [record[which] for record in records]
    else:
        raise ValueError(f"unknown figures {which!r}; choose test, validation or test_selected.")
    summary = {}
    for key in METRIC_KEYS:
        column = np.asarray([value[key] for value in values], dtype=np.float64)
        std = float(column.std(ddof=1)) if len(column) > 1 else 0.0
        summary[key] = {"mean": float(column.mean()), "std": std, "n": len(column)}
    if not all(math.isfinite(entry["mean"]) for entry in summary.values()):
        raise ValueError("non-finite metrics in the runs.")
    return summary


def summarize_records(records: Sequence[dict], which: str = "test") -> list[dict]:
    """One row per (method, budget), in order of first appearance: ``{"method", "budget", "pairs", "runs",
    "selected_epochs", "metrics": {key: {"mean", "std", "n"}}}`` with the mean and std over runs of ``which``
    (``"test"``, ``"validation"`` or ``"test_selected"``)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["budget"]), []).append(record)
    rows = []
    for (method, budget), runs in groups.items():
        rows.append(
            {
                "method": method,
                "budget": budget,
                "pairs": int(np.mean([run["pairs"] for run in runs])),
                "runs": len(runs),
                "selected_epochs": [run["selected_epoch"] for run in runs],
                "metrics": summarize(runs, which),
            }
        )
    return rows


def _cell(metric: Mapping[str, float]) -> str:
    return f"{metric['mean']:.1f} ± {metric['std']:.1f}"


def markdown_table(rows: Sequence[dict], budget_label: str = "pairs") -> str:
    """A Markdown table of ``summarize_records`` rows: method, budget, rsum and the six recalls (mean ± std)."""
    header = f"| method | {budget_label} | runs | " + " | ".join(LABELS[key] for key in TABLE_KEYS) + " |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(TABLE_KEYS)]
    for row in rows:
        budget = "all " + str(row["pairs"]) if row["budget"] is None else str(row["budget"])
        cells = " | ".join(_cell(row["metrics"][key]) for key in TABLE_KEYS)
        lines.append(f"| {row['method']} | {budget} | {row['runs']} | {cells} |")
    return "\n".join(lines)


def plot_recall_vs_budget(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """A PNG: rsum and each of the six recalls against the budget, one line per method (mean ± std as error
    bars); methods without a budget (``full``) are drawn as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    figure, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    panels = [axes[0, 0], *axes[0, 1:], *axes[1, :]]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    colors = {method: f"C{index}" for index, method in enumerate(methods)}
    budgets = sorted({row["budget"] for row in rows if row["budget"] is not None})
    for axis, key in zip(panels, TABLE_KEYS, strict=False):
        for method in methods:
            method_rows = [row for row in rows if row["method"] == method]
            with_budget = sorted((row for row in method_rows if row["budget"] is not None), key=lambda r: r["budget"])
            if with_budget:
                axis.errorbar(
                    [row["budget"] for row in with_budget],
                    [row["metrics"][key]["mean"] for row in with_budget],
                    yerr=[row["metrics"][key]["std"] for row in with_budget],
                    marker="o",
                    capsize=3,
                    color=colors[method],
                    label=method,
                )
            for row in method_rows:
                if row["budget"] is None:
                    mean, std = row["metrics"][key]["mean"], row["metrics"][key]["std"]
                    axis.axhline(mean, color=colors[method], linestyle="--", label=f"{method} ({row['pairs']} pairs)")
                    axis.axhspan(mean - std, mean + std, color=colors[method], alpha=0.12)
        if budgets:
            axis.set_xscale("log")
            axis.set_xticks(budgets)
            axis.set_xticklabels([str(budget) for budget in budgets])
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(LABELS[key] + (" (sum of the six recalls)" if key == "rsum" else " (%)"))
        axis.set_xlabel("training pairs")
        axis.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    panels[-1].axis("off")
    panels[-1].legend(handles, labels, loc="center")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_report(
    folder: str | Path,
    records: Sequence[dict],
    title: str = "Retrieval of students trained on few pairs",
    settings: Mapping | None = None,
    notes: str = "",
    test_selected: bool = False,
) -> dict[str, Path]:
    """Write ``results.md`` (table), ``results.json`` (settings, every run, the summary) and
    ``recall_vs_budget.png`` into ``folder``; returns their paths.

    The table holds test figures at the epoch selected on validation. With ``test_selected``, a second table
    holds the best-epoch-on-test figures, labelled "selected on test" (not a fair estimate: for comparison with
    published tables that select on test).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize_records(records, "test")
    plot = plot_recall_vs_budget(rows, folder / REPORT_FILES["plot"], title)
    body = [
        f"# {title}\n",
        "Test split, at the epoch selected on the validation split; mean ± std (ddof=1) over runs. rsum is the "
        "sum of the six recalls (%).\n",
        markdown_table(rows),
        "",
        f"![recall vs budget]({REPORT_FILES['plot']})",
        "",
    ]
    summary = {"test": rows}
    if test_selected:
        selected_rows = summarize_records(records, "test_selected")
        summary["test_selected"] = selected_rows
        body += [
            "## Selected on test\n",
            "Best epoch on the TEST split, as the reference code reports it: optimistic, for comparison with "
            "published tables only.\n",
            markdown_table(selected_rows),
            "",
        ]
    if notes:
        body += [notes.strip(), ""]
    markdown = folder / REPORT_FILES["markdown"]
    markdown.write_text("\n".join(body), encoding="utf-8")
    payload = {"title": title, "settings": dict(settings or {}), "summary": summary, "runs": list(records)}
    json_path = folder / REPORT_FILES["json"]
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default), encoding="utf-8")
    return {"markdown": markdown, "json": json_path, "plot": plot}


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
