"""Finished results: a bounded in-memory store, and their CSV and PNG exports (via :mod:`patchscopes.plots`)."""

from __future__ import annotations

import io
import secrets
import threading
from collections import OrderedDict
from typing import Any

import pandas as pd

from patchscopes import plots
from patchscopes.server.errors import ResultNotFoundError, ServerError

_PLOT_LOCK = threading.Lock()  # pyplot keeps global state: draw one figure at a time
CSV_COLUMNS = ["source_layer", "target_layer", "summary", "text", "top1", "top1_prob", "answer_prob", "top_tokens", "top_probs"]


class ResultStore:
    """The last ``capacity`` results by id (oldest evicted first), so exports never grow memory without bound."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, result: dict[str, Any], key: str | None = None) -> str:
        """Keep ``result``; ``key`` (the request, serialised) lets :meth:`find` answer the same request again."""
        rid = secrets.token_hex(8)
        with self._lock:
            self._items[rid] = {**result, "id": rid, "key": key}
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return rid

    def find(self, key: str) -> dict[str, Any] | None:
        """The newest kept result made for request ``key``, or None."""
        with self._lock:
            for item in reversed(self._items.values()):
                if item.get("key") == key:
                    return item
        return None

    def get(self, rid: str) -> dict[str, Any]:
        with self._lock:
            if rid not in self._items:
                raise ResultNotFoundError(
                    f"no result {rid!r} on this server (only the last {self.capacity} are kept); run the inspection again"
                )
            return self._items[rid]

    def __len__(self) -> int:
        return len(self._items)


def frame(result: dict[str, Any]) -> pd.DataFrame:
    """The result's rows as a table, with the request's prompt and models in every row."""
    df = pd.DataFrame(result["rows"])
    for col in CSV_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df[CSV_COLUMNS]
    meta = result["plan"]
    df.insert(0, "source_token", meta["source_token"])
    df.insert(0, "position", meta["position"])
    df.insert(0, "prompt", result["request"]["prompt"])
    df.insert(0, "preset", meta["preset"])
    df.insert(0, "target_model", meta["target_model"])
    df.insert(0, "model", meta["model"])
    return df


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` safe to open in a spreadsheet: text that starts like a formula gets a leading ``'``.

    Numbers, and text that is just a number, are kept as they are.

    >>> csv_cell("=HYPERLINK(1)"), csv_cell("-0.5"), csv_cell(-0.5), csv_cell("Paris")
    ("'=HYPERLINK(1)", '-0.5', -0.5, 'Paris')
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def to_csv(result: dict[str, Any]) -> str:
    """The result as CSV, with formula-like text escaped (CSV injection)."""
    df = frame(result)
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            df[col] = df[col].map(csv_cell)
    return df.to_csv(index=False, lineterminator="\r\n")  # RFC 4180; fields holding \r or \n get quoted


def to_png(result: dict[str, Any], value: str = "top1_prob") -> bytes:
    """A heatmap of ``value`` for a layer grid, a layer-by-layer text table otherwise."""
    if value not in ("top1_prob", "answer_prob"):
        raise ServerError(f"value {value!r} cannot be plotted; choose top1_prob or answer_prob")
    with _PLOT_LOCK:
        return _draw(frame(result), result, value)


def _draw(df: pd.DataFrame, result: dict[str, Any], value: str) -> bytes:
    meta = result["plan"]
    title = f"{meta['model']}: {result['request']['prompt'][:60]!r}, token {meta['source_token']!r}"
    if value == "answer_prob" and df["answer_prob"].isna().all():
        raise ServerError("this result has no answer probabilities; run it with an answer to plot answer_prob")
    if meta["grid"]:
        fig = plots.heatmap(df, value=value, title=f"{title}\n{value}")
    else:
        column = "p(answer)" if value == "answer_prob" else "p(top-1)"
        rows = [[str(r.source_layer), str(r.summary), f"{getattr(r, value):.2f}"] for r in df.itertuples()]
        fig = plots.text_table(rows, ["layer", meta["preset"], column], title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plots.plt.close(fig)
    return buffer.getvalue()
