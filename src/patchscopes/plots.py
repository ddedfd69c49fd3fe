"""Heatmaps over (source layer, target layer), layer curves and layer-by-layer text tables (matplotlib).

>>> from patchscopes import TOKEN_IDENTITY, sweep
>>> df = sweep(lm, ["Diana, Princess of Wales"], TOKEN_IDENTITY, target_layers=None, progress=False)   # every (ℓ, ℓ*)
>>> fig = heatmap(df, value="top1_prob")
>>> fig.savefig("grid.png")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from patchscopes.files import atomic_path

_NEXT_ENTRY = re.compile(r",\s*[^,:\n]{1,60}:")


def first_entry(text: str) -> str:
    """The generated text up to the first newline or the start of the next few-shot entry (``, Name:``)."""
    text = text.strip()
    text = text.split("\n", 1)[0]
    match = _NEXT_ENTRY.search(text)
    if match:
        text = text[: match.start()]
    return text.lstrip(":").strip()


def one_line(text: str, limit: int = 40) -> str:
    """Generated text on one line, newlines shown as ⏎ (for continuations whose line breaks matter)."""
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def layer_key(layer: Any) -> float:
    return -1.0 if layer == "embeddings" else float(layer)


def layer_label(layer: Any) -> str:
    """``3`` for a layer stored as ``3.0`` (columns with missing values turn integers into floats)."""
    return str(int(layer)) if isinstance(layer, float) and layer.is_integer() else str(layer)


def heatmap(
    df: pd.DataFrame,
    value: str = "top1_prob",
    title: str | None = None,
    aggregate: str = "mean",
    cmap: str = "viridis",
    ax: Any = None,
    annotate: bool | None = None,
) -> Figure:
    """Mean of ``value`` per (source layer, target layer) as a heatmap; rows are target layers.

    ``annotate`` writes each cell's value in it (default: when the grid has at most 10 × 10 cells).
    """
    table = df.pivot_table(index="target_layer", columns="source_layer", values=value, aggfunc=aggregate)  # type: ignore[arg-type]
    table = table.reindex(sorted(table.columns, key=layer_key), axis=1).sort_index(ascending=False)
    if ax is None:
        width, height = max(3.6, 1.4 + 0.4 * table.shape[1]), max(2.8, 1.0 + 0.3 * table.shape[0])
        fig, ax = plt.subplots(figsize=(width, height))
    else:
        fig = ax.figure
    values = table.to_numpy(dtype=float)
    image = ax.imshow(values, aspect="auto", cmap=cmap)
    ax.set_xticks(range(table.shape[1]), [layer_label(c) for c in table.columns], fontsize=7, rotation=90)
    ax.set_yticks(range(table.shape[0]), [layer_label(i) for i in table.index], fontsize=7)
    if annotate if annotate is not None else max(values.shape) <= 10:
        middle = float(np.nanmin(values) + np.nanmax(values)) / 2 if np.isfinite(values).any() else 0.0
        for (row, col), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(col, row, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if v > middle else "white")
    ax.set_xlabel("source layer ℓ")
    ax.set_ylabel("target layer ℓ*")
    heading = title or f"{aggregate} {value}"
    longest = max(len(line) for line in heading.splitlines())
    ax.set_title(heading, **({"fontsize": 11.0 * 34 / longest} if longest > 34 else {}))  # long titles fit the width
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def layer_curves(
    df: pd.DataFrame, value: str, by: str, layer: str = "source_layer", title: str | None = None, ylabel: str | None = None
) -> Figure:
    """Mean ``value`` per layer, one line per group in column ``by``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, part in df.groupby(by):
        curve = part.groupby(layer)[value].mean()
        curve = curve.reindex(sorted(curve.index, key=layer_key))
        ax.plot([layer_key(i) for i in curve.index], curve.to_numpy(), marker="o", markersize=3, label=str(name))
    ax.set_xlabel(layer.replace("_", " "))
    ax.set_ylabel(ylabel or value)
    ax.set_title(title or f"{value} by {layer}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str], title: str = "") -> Figure:
    """A layer-by-layer table of decoded text rendered as a figure."""
    fig, ax = plt.subplots(figsize=(11, 0.6 + 0.24 * (len(rows) + 1)))
    ax.axis("off")
    cells = [[str(c)[:70] for c in row] for row in rows]
    table = ax.table(cellText=cells, colLabels=list(header), loc="center", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(header))))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=130, format=target.suffix.lstrip(".") or None)
    plt.close(fig)
    return target
