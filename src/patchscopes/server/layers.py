"""Layer lists as text: ``all``, ``7``, ``-1``, ``0-10``, ``0-29:3``, ``1,5,9`` or mixes.

>>> parse_layers("0-9:3,-1", 30)
[0, 3, 6, 9, 29]
"""

from __future__ import annotations

import re

from patchscopes.server.errors import ServerError

_PART = re.compile(r"^(-?\d+)(?:-(-?\d+))?(?::(\d+))?$")


class LayerSpecError(ServerError):
    """A layer list that does not parse or names a layer outside the model."""

    status = 422
    kind = "bad_layers"


def parse_layers(text: str, n_layers: int) -> list[int]:
    """Sorted, distinct block indices (0..n_layers-1) described by ``text``."""
    spec = text.strip()
    if spec == "all":
        return list(range(n_layers))
    if not spec or len(spec) > 200:
        raise LayerSpecError(f"layer list {text!r} is empty or too long; write e.g. 'all', '0-29:3' or '1,5,9'")
    layers: set[int] = set()
    for part in spec.split(","):
        match = _PART.match(part.strip())
        if match is None:
            raise LayerSpecError(f"cannot read {part.strip()!r} in layer list {text!r}; write e.g. 'all', '0-29:3' or '1,5,9'")
        lo, hi, step = match.group(1), match.group(2), match.group(3)
        bounds = [int(lo)] if hi is None else [int(lo), int(hi)]
        for value in bounds:
            if not -n_layers <= value < n_layers:
                raise LayerSpecError(
                    f"layer {value} is out of range for a model with {n_layers} blocks; valid: 0..{n_layers - 1}"
                )
        start = int(lo) % n_layers
        stop = start if hi is None else int(hi) % n_layers
        stride = int(step) if step else 1
        if stride < 1:
            raise LayerSpecError(f"step {stride} in {part.strip()!r} must be at least 1")
        if stop < start:
            raise LayerSpecError(f"range {part.strip()!r} runs backwards; write the lower layer first")
        layers.update(range(start, stop + 1, stride))
    return sorted(layers)
