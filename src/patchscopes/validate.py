"""Validation shared by the CLI and the explorer: layer lists as text.

One parser, so ``patchscopes inspect --layers`` and the explorer's ``source_layers`` accept and refuse the
same things. Out of range is an error, never a wrap::

    >>> parse_layers("0-9:3,-1", 30)
    [0, 3, 6, 9, 29]
    >>> parse_layers("0-40", 30)
    Traceback (most recent call last):
    ...
    patchscopes.errors.LayerError: layer 40 is out of range for a model with 30 blocks; valid: 0..29 (or -30..-1 from the end)
"""

from __future__ import annotations

import re

from patchscopes.errors import LayerError

_PART = re.compile(r"^(-?\d+)(?:-(-?\d+))?(?::(\d+))?$")
_EXAMPLES = "write e.g. 'all', '7', '-1', '0-29:3' or '1,5,9'"


def parse_layers(text: str, n_layers: int) -> list[int]:
    """Sorted, distinct block indices (0..n_layers-1) described by ``text``: ``all``, ``7``, ``-1``,
    ``0-10``, ``0-29:3``, ``1,5,9`` or mixes. Raises :class:`LayerError` naming the bad part."""
    spec = text.strip()
    if spec == "all":
        return list(range(n_layers))
    if not spec or len(spec) > 200:
        raise LayerError(f"layer list {text!r} is empty or too long; {_EXAMPLES}")
    layers: set[int] = set()
    for part in spec.split(","):
        match = _PART.match(part.strip())
        if match is None:
            raise LayerError(f"cannot read {part.strip()!r} in layer list {text!r}; {_EXAMPLES}")
        lo, hi, step = match.group(1), match.group(2), match.group(3)
        bounds = [int(lo)] if hi is None else [int(lo), int(hi)]
        for value in bounds:
            if not -n_layers <= value < n_layers:
                raise LayerError(
                    f"layer {value} is out of range for a model with {n_layers} blocks; valid: 0..{n_layers - 1} "
                    f"(or {-n_layers}..-1 from the end)"
                )
        start = int(lo) % n_layers
        stop = start if hi is None else int(hi) % n_layers
        stride = int(step) if step else 1
        if stride < 1:
            raise LayerError(f"step {stride} in {part.strip()!r} must be at least 1")
        if stop < start:
            raise LayerError(f"range {part.strip()!r} runs backwards; write the lower layer first")
        layers.update(range(start, stop + 1, stride))
    return sorted(layers)


__all__ = ["parse_layers"]
