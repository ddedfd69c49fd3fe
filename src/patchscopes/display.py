"""Rich display in notebooks: a :class:`~patchscopes.scope.PatchscopeResult` renders as a small HTML card
(the layers, the source tokens, the decoded text and the top tokens with probability bars).

Jupyter calls ``_repr_html_`` on the last value of a cell; sweeps are pandas DataFrames, which already
render as tables.

>>> from patchscopes.display import probability_bar
>>> probability_bar(0.5)
'<span style="display:inline-block;width:3.0em;height:0.7em;background:#4c78a8"></span>'
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patchscopes.scope import PatchscopeResult

#: The longest probability bar, in ``em``.
BAR_EM = 6.0


def probability_bar(p: float) -> str:
    """An inline bar ``p`` × :data:`BAR_EM` wide (``p`` clipped to [0, 1])."""
    width = round(max(0.0, min(1.0, p)) * BAR_EM, 2)
    return f'<span style="display:inline-block;width:{width}em;height:0.7em;background:#4c78a8"></span>'


def _visible(token: str) -> str:
    """A token as the explorer shows it: quotes keep leading spaces visible, newlines become ⏎."""
    return escape(repr(token).replace("\\n", "⏎"))


def result_html(result: PatchscopeResult, top_k: int = 5) -> str:
    """The HTML card of one result (what a notebook shows for it)."""
    scope = result.scope
    source = "".join(result.source_tokens)
    target = scope.target.prompt if scope.target.prompt not in (None, "same") else scope.source.prompt
    rows = "".join(
        f"<tr><td><code>{_visible(t)}</code></td><td style='text-align:right'>{p:.3f}</td><td>{probability_bar(p)}</td></tr>"
        for t, p in zip(result.top_tokens[:top_k], result.top_probs[:top_k])
    )
    text = f"<p><b>decoded:</b> <code>{escape(result.text)}</code></p>" if result.text else ""
    return (
        "<div class='patchscope-result'>"
        f"<p><b>Patchscope</b> layer {escape(str(result.source_layer))} → {escape(str(result.target_layer))}; "
        f"source tokens <code>{escape(source)}</code> of <code>{escape(str(scope.source.prompt))}</code>; "
        f"target <code>{escape(str(target))}</code> at {result.target_positions}</p>"
        f"{text}"
        f"<table><thead><tr><th>next token</th><th>p</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        "</div>"
    )
