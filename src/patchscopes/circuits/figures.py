"""Figures of a circuits run: composition (two measures), Jaccard overlap, faithfulness, EAP curves, edits.

>>> from patchscopes.circuits.pipeline import RunConfig, discover, report
>>> _ = discover(lm, RunConfig.quick_profile(), "runs/circuits/quick", log=lambda line: None)
>>> paths = write_all(report("runs/circuits/quick"), Path("figures"))
>>> sorted(p.name for p in paths)
['composition.png', 'eap_faithfulness.png', 'faithfulness.png', 'overlap.png']
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from patchscopes.plots import save

TYPE_COLOURS = {"attention": "tab:blue", "mlp": "tab:orange", "norm": "tab:green", "embedding": "tab:purple", "other": "tab:gray"}


def composition_figure(comp: pd.DataFrame) -> Figure:
    """Stacked shares per circuit: of kept parameters, of modules with a kept weight; and each type's density."""
    measures = [
        ("share_of_kept_params", "share of kept parameters"),
        ("share_of_circuit_modules", "share of modules with kept weights"),
        ("type_density", "kept share within the type"),
    ]
    labels = list(dict.fromkeys(comp["circuit"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.6 + 0.35 * max(len(labels), 3)), sharey=True)
    for ax, (col, title) in zip(axes, measures):
        left = np.zeros(len(labels))
        for t, colour in TYPE_COLOURS.items():
            part = comp[comp.module_type == t].set_index("circuit").reindex(labels)[col].fillna(0).to_numpy()
            if not part.any():
                continue
            if col == "type_density":
                ax.scatter(part, range(len(labels)), color=colour, label=t, s=18)
            else:
                ax.barh(range(len(labels)), part, left=left, color=colour, label=t)
                left += part
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def overlap_figure(overlap: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(overlap), 1.2 + 0.4 * len(overlap)))
    image = ax.imshow(overlap.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(overlap)), overlap.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(overlap)), overlap.index, fontsize=7)
    for i in range(len(overlap)):
        for j in range(len(overlap)):
            ax.text(j, i, f"{float(overlap.to_numpy()[i, j]):.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_title("Jaccard overlap of kept weights", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def faithfulness_figure(df: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (task, kind), part in df[df.circuit != "full"].groupby(["task", "circuit"]):
        part = part.sort_values("density")
        ax.plot(part.density, part.agreement, marker="o", ls="-" if kind == "mask" else ":", label=f"{task} ({kind})")
    ax.set_xlabel("density (share of masked weights kept)")
    ax.set_ylabel("agreement with the full model (held out)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def eap_figure(df: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (task, method), part in df.groupby(["task", "method"]):
        part = part.sort_values("top_n")
        ax.plot(part.top_n.clip(lower=1), part.faithfulness, marker="o", label=f"{task} {method}")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (top n by |score|)")
    ax.set_ylabel("faithfulness (logit diff recovered)")
    ax.axhline(1, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def edits_figure(df: pd.DataFrame) -> Figure:
    """Edit success (trained prompts, paraphrases), ΔNLL of the new target and locality, by circuit density and
    selection; one row of panels per edited task, each bar the mean over seeds."""
    selections = ["circuit", "complement", "random"]
    columns = [c for c in ("success", "paraphrase_success", "delta_nll_new", "locality_unchanged") if c in df]
    titles = {
        "success": "edit success (p(new) > p(old))",
        "paraphrase_success": "success on paraphrases",
        "delta_nll_new": "Δ NLL of the new target",
        "locality_unchanged": "locality (choice unchanged)",
    }
    density = df["target_density"] if "target_density" in df else df["density"]
    df = df.assign(d=density.astype(float).round(4), task=df["task"] if "task" in df else "hierarchy")
    tasks = list(dict.fromkeys(df["task"]))
    fig, axes = plt.subplots(len(tasks), len(columns), figsize=(3.6 * len(columns), 3.0 * len(tasks)), squeeze=False)
    width = 0.8 / len(selections)
    for i, task in enumerate(tasks):
        means = df[df.task == task].groupby(["selection", "d"])[columns].mean()
        densities = sorted({d for _, d in means.index})
        for j, col in enumerate(columns):
            ax = axes[i][j]
            for k, sel in enumerate(selections):
                if sel in means.index.get_level_values(0):
                    values = means.loc[sel][col].reindex(densities).to_numpy()
                    ax.bar(np.arange(len(densities)) + k * width, values, width, label=sel)
            ax.set_xticks(np.arange(len(densities)) + width, [f"{d:.0%}" for d in densities])
            ax.set_xlabel(f"{task} circuit density")
            ax.set_title(titles[col], fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_all(tables: dict[str, pd.DataFrame], directory: Path) -> list[Path]:
    """Write every figure whose table is present; returns the paths."""
    makers = {
        "composition": ("composition.png", composition_figure),
        "overlap": ("overlap.png", overlap_figure),
        "faithfulness": ("faithfulness.png", faithfulness_figure),
        "eap": ("eap_faithfulness.png", eap_figure),
        "edits": ("edits.png", edits_figure),
    }
    paths = []
    for name, (filename, maker) in makers.items():
        if name in tables and len(tables[name]):
            paths.append(save(maker(tables[name]), directory / filename))
    return paths
