"""One request per batch: source capture, mapping and patched decoding in a single nnsight session.

:func:`~patchscopes.backends.nnsight_backend.run_many_nnsight` sends two requests per batch and maps the
captured states on the client. Here both traces run in one ``session``: the source states stay where the
model is (on NDIF's GPUs for a remote model), the mapping runs there too, and one request goes out per
batch. The mapping must therefore be expressible without this package: the identity, or an
:class:`~patchscopes.mappings.AffineMap` (its weight and bias travel with the request).

    >>> from patchscopes.backends.nnsight_session import run_many_session
    >>> results = run_many_session(scopes, ndif_model("meta-llama/Llama-3.1-70B"))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from patchscopes.backends.errors import BackendError
from patchscopes.backends.nnsight_backend import (
    NNsightModel,
    Remote,
    _generate_kwargs,
    _trace_kwargs,
    as_nnsight,
    blocks_envoy,
    check_models_ready,
    require_nnsight,
    write_patch,
)
from patchscopes.batching import chunks
from patchscopes.mappings import AffineMap, Identity
from patchscopes.models.loading import ModelHandle
from patchscopes.scope import Generate, Patchscope, PatchscopeResult, _resolve, _Resolved, _result

Affine = tuple[torch.Tensor, torch.Tensor] | None  # (weight [d_out, d_in], bias [d_out]), or None for the identity


def inline_mapping(mapping: Any) -> Affine:
    """The mapping as tensors the request can carry: ``None`` (identity) or ``(weight, bias)``."""
    if isinstance(mapping, Identity):
        return None
    if isinstance(mapping, AffineMap):
        return mapping.weight.detach().cpu(), mapping.bias.detach().cpu()
    raise BackendError(
        f"one request per batch runs the mapping next to the model, which needs the identity or an AffineMap, "
        f"not {type(mapping).__name__}; use run_many_nnsight (the mapping then runs on the client)"
    )


def session_patched(
    nm: NNsightModel,
    sources: Sequence[tuple[list[int], list[int], list[int]]],
    items: Sequence[tuple[int, int, Affine, list[int], int, list[int], str]],
    decoding: Any,
) -> list[tuple[torch.Tensor, list[int]]]:
    """One session: capture ``sources`` ``(ids, positions, layers)``, then decode ``items``
    ``(source index, source layer, mapping, target ids, target layer, target positions, mode)``."""
    blocks = blocks_envoy(nm)
    envoy = nm.envoy
    nnsight = require_nnsight()
    deepest = max(layer for _, _, layers in sources for layer in layers)
    gen_kwargs = _generate_kwargs(nm, decoding)
    with envoy.session(**_trace_kwargs(nm, "session")):
        states = {}  # keyed by source index: invokes may finish in any order
        with envoy.trace() as capture:
            for k, (ids, cols, layers) in enumerate(sources):
                with capture.invoke(ids):
                    seen = {}
                    for layer in sorted(set(layers)):
                        if layer < 0:
                            h = blocks[0].input
                        else:
                            o = blocks[layer].output
                            h = o[0] if isinstance(o, tuple) else o
                        seen[layer] = h[0, [h.shape[1] - len(ids) + p for p in cols]].detach().clone()
                    states[k] = seen
            with capture.invoke():
                _ = blocks[0].input if deepest < 0 else blocks[deepest].output
                capture.stop()
        logits = nnsight.save({})
        with envoy.generate(**gen_kwargs) as decode:
            for row, (source, source_layer, affine, ids, layer, cols, mode) in enumerate(items):
                with decode.invoke(ids):
                    v = states[source][source_layer]
                    if affine is not None:
                        w = affine[0].to(device=v.device, dtype=v.dtype)
                        v = v @ w.T + affine[1].to(device=v.device, dtype=v.dtype)
                    write_patch(blocks, layer, len(ids), cols, v, mode)
                    logits[row] = envoy.output.logits[0, -1].detach().float().cpu()
            with decode.invoke():
                sequences = nnsight.save(decode.result.detach().cpu())
    width = max(len(ids) for _, _, _, ids, *_ in items)
    outputs = []
    for row in range(len(items)):
        lg = logits[row]
        generated: list[int] = []
        if isinstance(decoding, Generate) and decoding.max_new_tokens > 0:
            for token in sequences[row, width : width + decoding.max_new_tokens].tolist():
                if token in nm.handle.eos_ids:
                    break
                generated.append(int(token))
        outputs.append((lg, generated))
    return outputs


def _plan(part: Sequence[int], resolved: Sequence[_Resolved]) -> tuple[list[tuple[list[int], list[int], list[int]]], list[tuple]]:
    index: dict[tuple, int] = {}
    layers: list[set[int]] = []
    sources: list[tuple[list[int], list[int]]] = []
    items = []
    for i in part:
        r = resolved[i]
        key = (tuple(r.src_ids), tuple(r.src_positions))
        if key not in index:
            index[key] = len(sources)
            sources.append((list(r.src_ids), list(r.src_positions)))
            layers.append(set())
        layers[index[key]].add(r.src_layer)
        target = (list(r.tgt_ids), r.tgt_layer, list(r.tgt_positions), r.scope.mode)
        items.append((index[key], r.src_layer, inline_mapping(r.mapping), *target))
    return [(ids, cols, sorted(ls)) for (ids, cols), ls in zip(sources, layers)], items


def run_many_session(
    scopes: Sequence[Patchscope],
    model: ModelHandle | NNsightModel,
    batch_size: int = 16,
    remote: Remote | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[PatchscopeResult]:
    """Run Patchscopes with one nnsight request per batch (source and target on the same model).

    Same results as :func:`~patchscopes.scope.run_many`; each batch captures its own sources.
    """
    nm = as_nnsight(model, remote)
    lm = nm.handle
    check_models_ready([nm])
    resolved = [_resolve(s, lm, lm) for s in scopes]
    for r in resolved:
        inline_mapping(r.mapping)  # refuse a client-side mapping before anything runs
        if isinstance(r.mapping, AffineMap) and r.mapping.d_out != lm.hidden_size:
            raise BackendError(f"the affine map returns size {r.mapping.d_out} but {lm.name} has hidden size {lm.hidden_size}")
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(resolved):
        groups.setdefault(r.scope.decoding, []).append(i)
    for decoding, idx in groups.items():
        for part in chunks(idx, batch_size):
            sources, items = _plan(part, resolved)
            outs = session_patched(nm, sources, items, decoding)
            for i, (logits, generated) in zip(part, outs):
                results[i] = _result(resolved[i], logits, generated, lm, lm, decoding.top_k)
            if on_batch is not None:
                on_batch(len(part))
    return [r for r in results if r is not None]


__all__ = ["inline_mapping", "run_many_session", "session_patched"]
