"""The one row schema: a :class:`~patchscopes.scope.PatchscopeResult` as a table row.

Sweeps, lenses, the explorer and the evaluations all build their rows here. Columns: ``example,
source_prompt, source_position, source_token, source_layer, target_prompt, target_position, target_layer,
text, top_tokens, top_probs, top1, top1_prob`` (a single position is a number, several are a list), plus
whatever a caller's ``extra`` adds. A target with a ``chat`` option other than ``False`` adds ``target_chat``
(whether the prompt was wrapped with the chat template) and ``target_text`` (the text the target model read).
:func:`json_row` is the same row made safe for JSON.

>>> json_row({"source_layer": 3, "target_layer": 3, "text": "x", "top_tokens": ["x"], "top_probs": [float("nan")],
...           "top1": "x", "top1_prob": 0.5}, generate=False)["top_probs"]
[None]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from patchscopes.plots import first_entry
from patchscopes.scope import PatchscopeResult

COLUMNS = [
    "example",
    "source_prompt",
    "source_position",
    "source_token",
    "source_layer",
    "target_prompt",
    "target_position",
    "target_layer",
    "text",
    "top_tokens",
    "top_probs",
    "top1",
    "top1_prob",
]


def _position(positions: list[int]) -> int | list[int]:
    return positions[-1] if len(positions) == 1 else positions


def result_row(example: int, result: PatchscopeResult) -> dict[str, Any]:
    """The row of one result; ``example`` numbers the input prompt it came from."""
    scope = result.scope
    row: dict[str, Any] = {
        "example": example,
        "source_prompt": scope.source.prompt,
        "source_position": _position(result.source_positions),
        "source_token": "".join(result.source_tokens),
        "source_layer": result.source_layer,
        "target_prompt": scope.target.prompt if scope.target.prompt is not None else scope.source.prompt,
        "target_position": _position(result.target_positions),
        "target_layer": result.target_layer,
        "text": result.text,
        "top_tokens": result.top_tokens,
        "top_probs": result.top_probs,
        "top1": result.top_tokens[0],
        "top1_prob": result.top_probs[0],
    }
    if scope.target.chat is not False:
        row["target_chat"] = result.chat_text is not None
        row["target_text"] = row["target_prompt"] if result.chat_text is None else result.chat_text
    return row


def finite(value: Any) -> float | None:
    """A probability for JSON: rounded to 6 places, None when not finite."""
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None


def json_row(row: Mapping[str, Any], generate: bool) -> dict[str, Any]:
    """The explorer's view of a row: layers, texts (``summary``: the first generated entry), top tokens, finite floats."""
    text = str(row["text"])
    out: dict[str, Any] = {
        "source_layer": row["source_layer"] if row["source_layer"] == "embeddings" else int(row["source_layer"]),
        "target_layer": row["target_layer"] if row["target_layer"] == "embeddings" else int(row["target_layer"]),
        "text": text,
        "summary": first_entry(text) if generate else text,
        "top_tokens": list(row["top_tokens"]),
        "top_probs": [finite(p) for p in row["top_probs"]],
        "top1": str(row["top1"]),
        "top1_prob": finite(row["top1_prob"]),
    }
    if "answer_prob" in row:
        out["answer_prob"] = finite(row["answer_prob"])
    return out


__all__ = ["COLUMNS", "finite", "json_row", "result_row"]
