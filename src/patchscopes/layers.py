"""Where a hidden state lives: a block's output, or the embeddings (the input of block 0).

A user names a layer with an int (negative counts from the end) or ``"embeddings"``; :func:`resolve_layer`
turns that into a :data:`Location` — a block index ``0..L-1`` or :data:`EMBEDDINGS` — and is the one place
where negative indices are read. Nothing inside the library stands for the embeddings with an integer.

>>> resolve_layer(-1, 30), resolve_layer("embeddings", 30)
(29, 'embeddings')
>>> sorted([3, EMBEDDINGS, 0], key=depth)
['embeddings', 0, 3]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Union

from patchscopes.errors import LayerError

EMBEDDINGS: Literal["embeddings"] = "embeddings"

#: A resolved location: a block index ``0..L-1`` or :data:`EMBEDDINGS`.
Location = Union[int, Literal["embeddings"]]

#: A user's layer: a block index (negative from the end) or ``"embeddings"``.
LayerSpec = Union[int, str]


def resolve_layer(layer: LayerSpec, n_layers: int) -> Location:
    """Resolve a user layer (int, negative allowed, or ``"embeddings"``) against a model of ``n_layers`` blocks.

    >>> resolve_layer(40, 30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    patchscopes.errors.LayerError: layer 40 is out of range for a model with 30 blocks; valid: 0..29 ...
    """
    if isinstance(layer, str):
        if layer == EMBEDDINGS:
            return EMBEDDINGS
        raise LayerError(f"layer {layer!r} is not a block index or {EMBEDDINGS!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerError(f"layer must be an int or {EMBEDDINGS!r}, not {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise LayerError(
            f"layer {layer} is out of range for a model with {n_layers} blocks; valid: 0..{n_layers - 1} "
            f"(or {-n_layers}..-1 from the end, or {EMBEDDINGS!r})"
        )
    return layer % n_layers


def resolve_block(layer: LayerSpec, n_layers: int, what: str = "this") -> int:
    """Resolve a user layer that must be a block (not the embeddings), for computations between blocks."""
    location = resolve_layer(layer, n_layers)
    if location == EMBEDDINGS:
        raise LayerError(f"{what} needs a block index (0..{n_layers - 1}, or negative from the end), not {EMBEDDINGS!r}")
    return int(location)


def resolve_layers(layers: Iterable[LayerSpec], n_layers: int) -> list[Location]:
    """Resolve several layers, keeping their order."""
    return [resolve_layer(layer, n_layers) for layer in layers]


def depth(location: Location) -> int:
    """Execution order of a location: the embeddings come before block 0 (a sort key)."""
    return -1 if location == EMBEDDINGS else int(location)


def is_block(location: Location) -> bool:
    """Whether ``location`` is a block output (not the embeddings)."""
    return location != EMBEDDINGS


__all__ = ["EMBEDDINGS", "LayerSpec", "Location", "depth", "is_block", "resolve_block", "resolve_layer", "resolve_layers"]
