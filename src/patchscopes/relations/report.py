"""The Table 5 analogue as Markdown beside the paper's numbers, and the sweep curves as a figure.

>>> print(markdown_table(summary, paper_table5()))          # doctest: +SKIP
>>> plot_sweep(ResultStore(out / "sweep", cfg).frame("sweep"), "sweep.png")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.datasets import DataNotFoundError, data_file
from patchscopes.files import atomic_path

PAPER_KEYS = {"LRC": "LRC", "LRC (first token, final layer)": "LRC_ft_lfinal", "SVM": "SVM", "input averaging": "input_averaging"}
METHOD_ORDER = list(PAPER_KEYS)


SINGLE_SAMPLE_KEYS = {"LRC (n_lre = 1, same object)": "same_object", "LRC (n_lre = 1, different object)": "different_object"}


def paper_tables() -> dict[str, Any]:
    """The LRC paper's transcribed tables (``paper_tables/lrc_tables.json``), or ``{}`` when the data is absent."""
    try:
        path = data_file("paper_tables/lrc_tables.json")
    except DataNotFoundError:
        return {}
    return dict(json.loads(Path(path).read_text()))


def paper_table5() -> dict[str, Any] | None:
    """The LRC paper's Table 5 (``paper_tables/lrc_tables.json``), or None when the data is absent."""
    return paper_tables().get("table5_main")


def single_sample_table(summary: dict[str, Any], model: str = "this model") -> str:
    """Table 6: LRCs from a one-prompt LRE of the same or of another object, beside the paper (Llama2-7b)."""
    paper = paper_tables().get("table6_single_training_sample_llama2", {})
    lines = [f"| LRE training prompt | {model} accuracy | {model} causality | Llama2-7b acc / causality (paper) |"]
    lines.append("|---|---|---|---|")
    for method, key in SINGLE_SAMPLE_KEYS.items():
        got = summary.get("table", {}).get(method, {})
        ref = paper.get(key, {})
        cell = f"{ref['acc'][0]:.2f} / {ref['causality'][0]:.2f}" if ref else "–"
        lines.append(f"| {key.replace('_', ' ')} | {_cell(got.get('accuracy'))} | {_cell(got.get('causality'))} | {cell} |")
    return "\n".join(lines)


def significance_table(summary: dict[str, Any]) -> str:
    """Tables 7-8: per seed and metric, LRC against SVM on the same prompts: exact McNemar p and the paper's z-test p."""
    lines = ["| metric | seed | n | LRC | SVM | only LRC right | only SVM right | McNemar p | z-test p (the paper's) |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in summary.get("significance", []):
        cells = [r["kind"], r["seed"], r["n"], f"{r['a']:.3f}", f"{r['b']:.3f}", r["only_a"], r["only_b"], f"{r['p']:.2g}"]
        cells.append(f"{r['p_z']:.2g}" if "p_z" in r else "–")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def markdown_table(summary: dict[str, Any], paper: dict[str, Any] | None = None, model: str = "this model") -> str:
    """Rows: methods; columns: accuracy and causality here, then the paper's models."""
    papers = sorted(paper) if paper else []
    head = f"| method | {model} accuracy | {model} causality |" + "".join(f" {m} acc / causality (paper) |" for m in papers)
    sep = "|---|---|---|" + "---|" * len(papers)
    lines = [head, sep]
    for method in METHOD_ORDER:
        got = summary.get("table", {}).get(method, {})
        row = f"| {method} | {_cell(got.get('accuracy'))} | {_cell(got.get('causality'))} |"
        for m in papers:
            ref = paper[m].get(PAPER_KEYS[method], {}) if paper else {}
            row += f" {ref['acc'][0]:.2f} / {ref['causality'][0]:.2f} |" if ref else " – |"
        lines.append(row)
    return "\n".join(lines)


def per_relation_table(summary: dict[str, Any]) -> str:
    """Accuracy and causality per relation and method (averaged over seeds)."""
    frame = pd.DataFrame(summary.get("per_relation", []))
    if frame.empty:
        return "(no rows)"
    pivot = frame.pivot_table(index=["relation", "method"], columns="kind", values="ok").reset_index()
    lines = ["| relation | method | accuracy | causality |", "|---|---|---|---|"]
    for _, r in pivot.iterrows():
        acc, caus = r.get("accuracy", float("nan")), r.get("causality", float("nan"))
        lines.append(f"| {r['relation']} | {r['method']} | {acc:.2f} | {caus:.2f} |")
    return "\n".join(lines)


def plot_sweep(frame: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One panel per sweep stage: validation accuracy and causality (macro over relations) against the value."""
    import matplotlib.pyplot as plt

    stages = [s for s in ("object_layer", "subject_layer", "rank", "beta") if s in set(frame.get("stage", []))]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(3.6 * max(len(stages), 1), 3.0), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        part = frame[frame["stage"] == stage].groupby("value")[["accuracy", "causality"]].mean().sort_index()
        for column, marker in (("accuracy", "o"), ("causality", "s")):
            ax.plot(part.index, part[column], marker=marker, label=column)
        if stage == "rank":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(stage.replace("_", " "))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation score")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(out).suffix.lstrip(".") or None)
    plt.close(fig)
    return out
