"""Read raw block outputs (the residual stream after block ℓ) at chosen layers and positions.

Layers are user layers (:mod:`patchscopes.layers`): ``0..L-1`` or negative from the end for block
outputs, ``"embeddings"`` for the input of block 0 (token embeddings plus whatever the model adds before
the first block). Hugging Face's last ``hidden_states`` entry has the final norm applied and is never used
as block L-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchscopes.batching import chunks, left_pad
from patchscopes.hooks import at_locations, not_run_error
from patchscopes.layers import EMBEDDINGS, LayerSpec, Location, depth, resolve_layers
from patchscopes.models.loading import ModelHandle


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(
    lm: ModelHandle,
    token_ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[LayerSpec],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Hidden states of each prompt at its (non-negative) positions, for each layer.

    Returns one tensor per prompt of shape ``[len(layers), len(positions[i]), d]`` (on CPU, model dtype),
    in the order of ``layers``. The forward pass stops after the deepest requested block.

    >>> states = capture(lm, [lm.tokenize("Hello world").ids], [[1]], [0, -1, "embeddings"])
    >>> states[0].shape == (3, 1, lm.hidden_size)
    True
    """
    order = resolve_layers(layers, lm.n_layers)
    wanted = set(order)
    deepest = max(order, key=depth)
    out: list[torch.Tensor] = []
    for start_chunk in chunks(list(range(len(token_ids))), batch_size):
        rows = list(start_chunk)
        batch = left_pad([token_ids[r] for r in rows], lm.pad_id, lm.device)
        got: dict[Location, torch.Tensor] = {}

        def grab(location: Location, hidden: torch.Tensor, got: dict[Location, torch.Tensor] = got) -> None:
            got[location] = hidden.detach()
            if location == deepest and len(got) == len(wanted):
                raise _StopForward

        with at_locations(lm.adapter.blocks, order, grab):
            try:
                lm.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
            except _StopForward:
                pass
        missing = [layer for layer in wanted if layer not in got]
        if missing:
            raise not_run_error(lm.name, missing, "there is no hidden state to read there")
        for i, r in enumerate(rows):
            cols = torch.tensor([batch.padded(i, p) for p in positions[r]], device=lm.device)
            stacked = torch.stack([got[layer][i, cols] for layer in order])
            out.append(stacked.cpu())
    return out


__all__ = ["EMBEDDINGS", "capture"]
