"""∂o/∂s for one prompt: the object-side hidden state as a differentiable function of the subject's.

The prompt up to (not including) the last subject token runs once without gradients and is kept as a KV
cache; the rest runs as a function of ``s`` (block ``ℓ_s`` output at the subject token), and the block
``ℓ_o`` outputs at the answer-predicting positions are averaged (``"mean"``) or the first one is taken
(``"first"``). :func:`torch.func.jacrev` (one object layer) or :func:`torch.func.jacfwd` (several layers
at once) give the Jacobian in one vectorised call, with eager attention (the fused CPU kernel has no
batching rule).

    >>> located = prompts[0].locate(lm)
    >>> jac = prompt_jacobian(lm, located, subject_layer=1, object_layers=[3])
    >>> jac.weight.shape == (1, lm.hidden_size, lm.hidden_size)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from patchscopes import compat
from patchscopes.errors import LayerError, SpecError
from patchscopes.hooks import at_locations
from patchscopes.models.gradients import frozen
from patchscopes.models.loading import ModelHandle
from patchscopes.relations.prompts import Located

Aggregation = Literal["mean", "first"]


@dataclass
class PromptJacobian:
    """Per-prompt first-order approximation ``o ≈ J s + (o₀ − J s₀)`` for each object layer."""

    weight: torch.Tensor  # [K, d, d]
    subject: torch.Tensor  # [d]
    object: torch.Tensor  # [K, d]

    @property
    def bias(self) -> torch.Tensor:
        return self.object - torch.einsum("kij,j->ki", self.weight, self.subject)


@contextmanager
def eager_attention(lm: ModelHandle) -> Iterator[None]:
    """Temporarily switch the model to eager attention (vmap-able); restore the previous implementation."""
    with compat.using_attention(lm.model, "eager"):
        yield


class _Stop(Exception):
    pass


def prompt_jacobian(
    lm: ModelHandle,
    located: Located,
    subject_layer: int,
    object_layers: Sequence[int],
    aggregation: Aggregation = "mean",
    chunk_size: int | None = 64,
) -> PromptJacobian:
    """Jacobian of the object representation at each of ``object_layers`` w.r.t. the subject state at ``subject_layer``.

    Layers are resolved block indices with ``subject_layer < min(object_layers)``.
    """
    if aggregation not in ("mean", "first"):
        raise SpecError(f"aggregation {aggregation!r} is not 'mean' or 'first'")
    layers = sorted(set(int(layer) for layer in object_layers))
    if not layers or not 0 <= subject_layer < layers[0] or layers[-1] >= lm.n_layers:
        raise LayerError(
            f"need 0 <= subject layer < object layers < {lm.n_layers}; got subject {subject_layer}, object {list(object_layers)}"
        )
    predicting = located.predicting if aggregation == "mean" else located.predicting[:1]
    start = located.subject
    ids = torch.tensor([located.ids[: predicting[-1] + 1]], device=lm.device)
    rel = [p - start for p in predicting]
    deepest = layers[-1]
    with eager_attention(lm), frozen(lm.model):  # gradients w.r.t. s only: no weight gradients built
        past = None
        if start > 0:
            with torch.no_grad():
                past = compat.output_cache(lm.model(input_ids=ids[:, :start], use_cache=True))
        suffix = ids[:, start:]
        position_ids = torch.arange(start, ids.shape[1], device=lm.device)[None]
        onehot = torch.zeros(1, suffix.shape[1], 1, device=lm.device, dtype=lm.dtype)
        onehot[0, 0, 0] = 1.0

        def forward(s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            got: dict[int, torch.Tensor] = {}

            def hook(layer: object, hidden: torch.Tensor) -> torch.Tensor | None:
                new = None
                if layer == subject_layer:
                    got[-1] = hidden[0, 0]
                    if s is not None:
                        new = hidden * (1 - onehot) + s[None, None, :] * onehot
                if layer in layers:
                    got[layer] = hidden
                if layer == deepest:
                    raise _Stop
                return new

            cache = copy.deepcopy(past) if past is not None else None
            with at_locations(lm.adapter.blocks, [subject_layer, *layers], hook):
                try:
                    lm.model(
                        input_ids=suffix,
                        position_ids=position_ids,
                        use_cache=cache is not None,
                        **(compat.cache_kwargs(lm.model, cache) if cache is not None else {}),
                    )
                except _Stop:
                    pass
            objects = torch.stack([got[layer][0, rel].mean(0) for layer in layers])
            return objects, got[-1]

        with torch.no_grad():
            o0, s0 = forward(None)
            s0 = s0.detach().clone()
        fn = lambda s: forward(s)[0]  # noqa: E731
        if len(layers) == 1:
            weight = torch.func.jacrev(fn, chunk_size=chunk_size)(s0)
        else:
            weight = torch.func.jacfwd(fn, randomness="same")(s0)
    return PromptJacobian(weight=weight.detach().float().cpu(), subject=s0.float().cpu(), object=o0.detach().float().cpu())
