"""One request per batch: source reads, mapping and patched decoding in a single nnsight session.

``NNsightExecutor()`` sends two requests per batch and maps the captured states on the client. With
``NNsightExecutor(one_request=True)`` both traces run in one ``session``: the source states stay where the
model is (on NDIF's GPUs for a remote model), the mapping runs there too, and one request goes out per
batch. The mapping must therefore be expressible without this package: the identity, or an
:class:`~patchscopes.mappings.AffineMap` (its weight and bias travel with the request).

    >>> from patchscopes.backends.nnsight_backend import run_many_session
    >>> results = run_many_session(scopes, ndif_model("meta-llama/Llama-3.1-70B"))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from patchscopes.backends.errors import BackendError
from patchscopes.backends.nnsight_model import NNsightModel, blocks_envoy, require_nnsight, touch
from patchscopes.backends.nnsight_ops import (
    decode_batches,
    generate_kwargs,
    generated_ids,
    read_states,
    trace_kwargs,
    write_patch,
)
from patchscopes.layers import depth
from patchscopes.mappings import AffineMap, Identity
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import RunOutput
from patchscopes.plan import Plan, plan_of

Affine = tuple[torch.Tensor, torch.Tensor] | None  # (weight [d_out, d_in], bias [d_out]), or None for the identity


def inline_mapping(mapping: Any) -> Affine:
    """The mapping as tensors the request can carry: ``None`` (identity) or ``(weight, bias)``."""
    if isinstance(mapping, Identity):
        return None
    if isinstance(mapping, AffineMap):
        return mapping.weight.detach().cpu(), mapping.bias.detach().cpu()
    raise BackendError(
        f"one request per batch runs the mapping next to the model, which needs the identity or an AffineMap, "
        f"not {type(mapping).__name__}; use NNsightExecutor() (the mapping then runs on the client)"
    )


def session_problem(lm: ModelHandle, plan: Plan) -> str | None:
    """Why ``plan`` cannot run as one request per batch on ``lm``, or None."""
    for step in plan.steps:
        try:
            inline_mapping(step.mapping)
        except BackendError as exc:
            return str(exc)
        if isinstance(step.mapping, AffineMap) and step.mapping.d_out != lm.hidden_size:
            return f"the affine map returns size {step.mapping.d_out} but {lm.name} has hidden size {lm.hidden_size}"
    return None


def session_patched(nm: NNsightModel, plan: Plan, decoding: Any) -> list[RunOutput]:
    """One session: every source read of ``plan``, then its steps decoded (all with ``decoding``)."""
    blocks = blocks_envoy(nm)
    envoy = nm.envoy
    nnsight = require_nnsight()
    deepest = max((layer for read in plan.reads for layer in read.layers), key=depth)
    with envoy.session(**trace_kwargs(nm, "session")):
        states = {}  # keyed by read index: invokes may finish in any order
        with envoy.trace() as capture:
            for k, read in enumerate(plan.reads):
                with capture.invoke(list(read.ids)):
                    states[k] = read_states(blocks, len(read.ids), read.positions, read.layers, clone=True)
            with capture.invoke():
                touch(blocks, deepest)
                capture.stop()
        logits = nnsight.save({})
        with envoy.generate(**generate_kwargs(nm, decoding)) as decode:
            for row, step in enumerate(plan.steps):
                affine = inline_mapping(step.mapping)
                with decode.invoke(list(step.target_ids)):
                    v = states[step.read][step.source_layer]
                    if affine is not None:
                        w = affine[0].to(device=v.device, dtype=v.dtype)
                        v = v @ w.T + affine[1].to(device=v.device, dtype=v.dtype)
                    write_patch(blocks, step.target_layer, len(step.target_ids), step.target_positions, v, step.scope.mode)
                    logits[row] = envoy.output.logits[0, -1].detach().float().cpu()
            with decode.invoke():
                sequences = nnsight.save(decode.result.detach().cpu())
    width = max(len(step.target_ids) for step in plan.steps)
    return [RunOutput(logits[row], generated_ids(nm, sequences, row, width, decoding)) for row in range(len(plan.steps))]


def run_session(nm: NNsightModel, plan: Plan, batch_size: int, on_batch: Callable[[int], None] | None) -> list[RunOutput]:
    """Every step of ``plan``, one session per batch (each batch reads its own sources)."""
    outputs: list[RunOutput | None] = [None] * len(plan.steps)
    for group in plan.decodes:
        for part in decode_batches(group, batch_size):
            for i, out in zip(part, session_patched(nm, plan_of([plan.steps[i] for i in part]), group.decoding)):
                outputs[i] = out
            if on_batch is not None:
                on_batch(len(part))
    return [o for o in outputs if o is not None]


__all__ = ["inline_mapping", "run_session", "session_patched", "session_problem"]
