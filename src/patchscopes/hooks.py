"""The one hook primitive: read or write the hidden state at a location during a forward pass.

Every native path goes through :func:`at_locations` (capture, patching, the replay engine's preparation,
steering, circuits, the explorer's cancellation check), and every write of a patch goes through
:func:`write` — native tensors and nnsight's traced values alike.

>>> import torch
>>> h = torch.zeros(1, 3, 2)
>>> write(h, (0, [1]), torch.ones(1, 2), "add"); h[0, 1].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from patchscopes.errors import LayerError, SpecError
from patchscopes.layers import EMBEDDINGS, Location, depth

PatchMode = Literal["replace", "add"]

#: ``fn(location, hidden)``: return a tensor to replace the hidden state, or None to leave it.
HiddenFn = Callable[[Location, torch.Tensor], "torch.Tensor | None"]


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor inside a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "hidden_states", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A block output with its hidden state replaced."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in a block output of type {type(output).__name__}")


def write(hidden: Any, index: Any, vectors: torch.Tensor, mode: PatchMode = "replace") -> None:
    """Write ``vectors`` into ``hidden[index]`` in place: replace it, or add to it.

    ``hidden`` is a tensor, or the value nnsight hands an intervention; ``vectors`` is cast to its device
    and dtype.
    """
    if mode not in ("replace", "add"):
        raise SpecError(f"patch mode {mode!r} is not 'replace' or 'add'")
    v = vectors.to(device=hidden.device, dtype=hidden.dtype)
    hidden[index] = v if mode == "replace" else hidden[index] + v


def not_run_error(model_name: str, missing: Sequence[Location], what: str) -> LayerError:
    """A requested block never ran (a cross-attention block without cross-attention input skips itself)."""
    return LayerError(
        f"block(s) {sorted(missing, key=depth)} did not run in the forward pass of {model_name}, so {what} "
        "(a cross-attention block without cross-attention input skips itself); choose other layers"
    )


@contextmanager
def at_locations(blocks: nn.ModuleList, locations: Sequence[Location], fn: HiddenFn) -> Iterator[None]:
    """Call ``fn(location, hidden)`` at each listed location; a returned tensor replaces the hidden state.

    A block index is hooked at that block's output; :data:`~patchscopes.layers.EMBEDDINGS` at the input
    of block 0.
    """
    handles = []
    for location in sorted(set(locations), key=depth):
        if location == EMBEDDINGS:

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                if args:
                    new = fn(EMBEDDINGS, args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(EMBEDDINGS, kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(module: nn.Module, args: tuple, output: Any, location: int = int(location)) -> Any:
                new = fn(location, hidden_of(output))
                return None if new is None else with_hidden(output, new)

            handles.append(blocks[int(location)].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["HiddenFn", "PatchMode", "at_locations", "hidden_of", "not_run_error", "with_hidden", "write"]
