"""Layer lists as text (the one parser of :mod:`patchscopes.validate`), refused with the explorer's error.

>>> parse_layers("0-9:3,-1", 30)
[0, 3, 6, 9, 29]
"""

from __future__ import annotations

from patchscopes import validate
from patchscopes.errors import LayerError
from patchscopes.server.errors import ServerError


class LayerSpecError(ServerError):
    """A layer list that does not parse or names a layer outside the model."""

    status = 422
    kind = "bad_layers"


def parse_layers(text: str, n_layers: int) -> list[int]:
    """:func:`patchscopes.validate.parse_layers`, with its error as the explorer's 422 answer."""
    try:
        return validate.parse_layers(text, n_layers)
    except LayerError as exc:
        raise LayerSpecError(str(exc)) from None
