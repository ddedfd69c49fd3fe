"""An interactive (plotly) heatmap of a sweep over (source layer, target layer), for notebooks.

Hovering a cell shows what the explorer's tooltip shows: ℓ, ℓ*, the cell's value (the mean over its
examples, with their count) and, for the cell's first example, the decoded text and its top tokens.
Install plotly with ``pip install "patchscopes[notebook]"``; the static heatmap is
:func:`patchscopes.plots.heatmap`.

>>> import pandas as pd
>>> rows = pd.DataFrame({"source_layer": [0, 0, 1], "target_layer": [0, 1, 1], "top1_prob": [0.1, 0.2, 0.9],
...                      "text": ["a", "b", "c"], "top_tokens": [["a"], ["b"], ["c"]], "top_probs": [[0.1], [0.2], [0.9]]})
>>> fig = interactive_heatmap(rows)
>>> [list(row) for row in fig.data[0].z]
[[0.1, None], [0.2, 0.9]]
"""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np
import pandas as pd

from patchscopes.errors import OptionError
from patchscopes.plots import layer_key, layer_label, one_line


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise OptionError(
            'the interactive heatmap needs plotly: pip install "patchscopes[notebook]" (or use patchscopes.plots.heatmap)'
        ) from exc
    return go


def _hover(cell: pd.DataFrame, value: str, source: Any, target: Any, top_k: int) -> str:
    first = cell.sort_values("example").iloc[0] if "example" in cell else cell.iloc[0]
    lines = [f"ℓ = {layer_label(source)}, ℓ* = {layer_label(target)}", f"{value} = {cell[value].mean():.3f} (n = {len(cell)})"]
    if "text" in cell and isinstance(first["text"], str) and first["text"]:
        lines.append(f"decoded: {escape(one_line(first['text'], 60))}")
    if "top_tokens" in cell and isinstance(first["top_tokens"], (list, tuple, np.ndarray)):
        probs = first.get("top_probs")
        shown = list(zip(first["top_tokens"], probs if probs is not None else [float("nan")] * len(first["top_tokens"])))
        lines.append("top tokens:")
        lines += [f"  {escape(repr(t))} {p:.3f}" for t, p in shown[:top_k]]
    return "<br>".join(lines)


def interactive_heatmap(df: pd.DataFrame, value: str = "top1_prob", title: str | None = None, top_k: int = 5) -> Any:
    """A plotly heatmap of the mean ``value`` per (ℓ, ℓ*) cell of a sweep table (rows: target layers).

    Returns a ``plotly.graph_objects.Figure``: shown inline by Jupyter, saved with ``fig.write_html(path)``.
    """
    for column in ("source_layer", "target_layer", value):
        if column not in df.columns:
            raise OptionError(f"the table has no column {column!r}; pass a sweep's rows (columns: {', '.join(df.columns)})")
    go = _plotly()
    sources = sorted(df["source_layer"].unique(), key=layer_key)
    targets = sorted(df["target_layer"].unique(), key=layer_key)
    z: list[list[float | None]] = [[None] * len(sources) for _ in targets]
    hover: list[list[str]] = [[""] * len(sources) for _ in targets]
    for (source, target), cell in df.groupby(["source_layer", "target_layer"], sort=False):
        row, col = targets.index(target), sources.index(source)
        mean = float(cell[value].mean())
        z[row][col] = mean if np.isfinite(mean) else None
        hover[row][col] = _hover(cell, value, source, target, top_k)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[layer_label(s) for s in sources],
            y=[layer_label(t) for t in targets],
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale="Viridis",
            colorbar={"title": value},
        )
    )
    fig.update_layout(
        title=title or f"mean {value}",
        xaxis={"title": "source layer ℓ", "type": "category"},
        yaxis={"title": "target layer ℓ*", "type": "category"},
        width=max(420, 160 + 22 * len(sources)),
        height=max(360, 140 + 18 * len(targets)),
    )
    return fig
