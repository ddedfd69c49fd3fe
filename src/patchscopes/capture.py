"""Read raw block outputs (the residual stream after block ℓ) at chosen layers and positions.

Layer indices here are resolved: ``0..L-1`` are block outputs and :data:`EMBEDDINGS` (-1 internally)
is the input of block 0 (token embeddings plus whatever the model adds before the first block).
Hugging Face's last ``hidden_states`` entry has the final norm applied and is never used as block L-1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from patchscopes.batching import chunks, left_pad
from patchscopes.errors import LayerError
from patchscopes.models.loading import ModelHandle

EMBEDDINGS = "embeddings"
EMBED_INDEX = -1  # internal index of the embeddings location after resolution

LayerSpec = int | str


def resolve_layer(layer: LayerSpec, n_layers: int) -> int:
    """Resolve a user layer (int, negative allowed, or ``"embeddings"``) to an internal index."""
    if isinstance(layer, str):
        if layer == EMBEDDINGS:
            return EMBED_INDEX
        raise LayerError(f"layer {layer!r} is not a block index or {EMBEDDINGS!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerError(f"layer must be an int or {EMBEDDINGS!r}, not {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise LayerError(
            f"layer {layer} is out of range for a model with {n_layers} blocks; valid: 0..{n_layers - 1} "
            f"(or {-n_layers}..-1 from the end, or {EMBEDDINGS!r})"
        )
    return layer % n_layers


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


HiddenFn = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextmanager
def layer_hooks(blocks: nn.ModuleList, layers: Sequence[int], fn: HiddenFn) -> Iterator[None]:
    """Call ``fn(layer, hidden)`` on each listed location; a returned tensor replaces the hidden state.

    Block ℓ ≥ 0 is hooked at its output; :data:`EMBED_INDEX` at the input of block 0.
    """
    handles = []
    for layer in sorted(set(layers)):
        if layer == EMBED_INDEX:

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                if args:
                    new = fn(EMBED_INDEX, args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(EMBED_INDEX, kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(module: nn.Module, args: tuple, output: Any, layer: int = layer) -> Any:
                new = fn(layer, hidden_of(output))
                return None if new is None else with_hidden(output, new)

            handles.append(blocks[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(
    lm: ModelHandle,
    token_ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Hidden states of each prompt at its positions, for each resolved layer.

    Returns one tensor per prompt of shape ``[len(layers), len(positions[i]), d]`` (on CPU, model dtype).
    The forward pass stops after the deepest requested block.

    >>> states = capture(lm, [lm.tokenize("Hello world").ids], [[-1 % 2]], [0, 5])  # doctest: +SKIP
    """
    order = list(layers)
    deepest = max(order)
    out: list[torch.Tensor] = []
    for start_chunk in chunks(list(range(len(token_ids))), batch_size):
        rows = list(start_chunk)
        batch = left_pad([token_ids[r] for r in rows], lm.pad_id, lm.device)
        got: dict[int, torch.Tensor] = {}

        def grab(layer: int, hidden: torch.Tensor, got: dict[int, torch.Tensor] = got) -> None:
            got[layer] = hidden.detach()
            if layer == deepest and len(got) == len(set(order)):
                raise _StopForward

        with layer_hooks(lm.adapter.blocks, order, grab):
            try:
                lm.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
            except _StopForward:
                pass
        missing = [layer for layer in order if layer not in got]
        if missing:
            raise LayerError(
                f"block(s) {missing} did not run in the forward pass of {lm.name}, so there is no hidden state to read "
                "there (a cross-attention block without cross-attention input skips itself); choose other layers"
            )
        for i, r in enumerate(rows):
            cols = torch.tensor([batch.padded(i, p) for p in positions[r]], device=lm.device)
            stacked = torch.stack([got[layer][i, cols] for layer in order])
            out.append(stacked.cpu())
    return out
