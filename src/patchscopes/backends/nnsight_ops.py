"""The nnsight traces the executor is made of: read sources, write patches, generate, in batches.

Each function works on an :class:`~patchscopes.backends.nnsight_model.NNsightModel` and builds traces that
reference nothing but torch and their own variables, so that nnsight can ship them to NDIF as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patchscopes.backends.nnsight_model import NNsightModel, blocks_envoy, hidden_at, require_nnsight, touch
from patchscopes.batching import chunks
from patchscopes.hooks import write
from patchscopes.layers import LayerSpec, Location, depth, resolve_layers
from patchscopes.patching import RunOutput
from patchscopes.plan import DecodeGroup
from patchscopes.scope import Generate


def trace_kwargs(nm: NNsightModel, kind: str) -> dict[str, Any]:
    """Where a trace runs: a recording backend, NDIF (the key set for every request), or here."""
    if nm.backend is not None:
        return {"backend": nm.backend(nm.envoy, kind)}
    if nm.remote is True:
        from patchscopes.backends.remote import api_key

        require_nnsight().CONFIG.API.APIKEY = api_key()
    if nm.remote == "local":
        from patchscopes.backends.dry_run import dry_run_backend

        return {"backend": dry_run_backend()(nm.envoy)}
    return {"remote": nm.remote} if nm.remote else {}


def check_models_ready(models: Sequence[NNsightModel]) -> None:
    """Before a real remote run, once per call: each remote model's key is set and the model is hosted."""
    for nm in {id(m): m for m in models}.values():
        if nm.remote is True and nm.backend is None:
            from patchscopes.backends.remote import check_remote_ready

            check_remote_ready(nm)


def read_states(blocks: Any, n_ids: int, cols: Sequence[int], layers: Sequence[Location], clone: bool = False) -> dict:
    """Inside an invoke: ``{layer: [len(cols), d]}`` at the unpadded positions ``cols`` (left padding counted)."""
    seen = {}
    for layer in sorted(set(layers), key=depth):  # nnsight serves locations in execution order
        h = hidden_at(blocks, layer)
        states = h[0, [h.shape[1] - n_ids + p for p in cols]].detach()
        seen[layer] = states.clone() if clone else states.cpu()
    return seen


def write_patch(blocks: Any, location: Location, n_ids: int, cols: Sequence[int], vectors: torch.Tensor, mode: str) -> None:
    """Inside an invoke: write ``vectors`` at ``location`` and the unpadded positions ``cols``."""
    h = hidden_at(blocks, location)
    write(h, (slice(None), [h.shape[1] - n_ids + p for p in cols]), vectors, mode)  # type: ignore[arg-type]


def capture_nnsight(
    nm: NNsightModel,
    token_ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[LayerSpec],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Like :func:`patchscopes.capture.capture`, through nnsight: ``[len(layers), n_pos, d]`` per prompt (CPU)."""
    order = resolve_layers(layers, nm.handle.n_layers)
    deepest = max(order, key=depth)
    blocks = blocks_envoy(nm)
    kwargs = trace_kwargs(nm, "source")
    nnsight = require_nnsight()
    out: list[torch.Tensor] = []
    for group in chunks(list(range(len(token_ids))), batch_size):
        items = [(list(token_ids[i]), list(positions[i])) for i in group]
        with nm.envoy.trace(**kwargs) as tracer:
            saved = nnsight.save({})  # keyed by row: invokes may finish in any order
            for row, (ids, cols) in enumerate(items):
                with tracer.invoke(ids):
                    seen = read_states(blocks, len(ids), cols, order)
                    saved[row] = torch.stack([seen[layer] for layer in order])
            with tracer.invoke():
                touch(blocks, deepest)
                tracer.stop()
        out.extend(saved[row] for row in range(len(items)))
    return out


def generate_kwargs(nm: NNsightModel, decoding: Any) -> dict[str, Any]:
    """``generate`` options that make Hugging Face's loop decode as the native one does."""
    lm = nm.handle
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(decoding.max_new_tokens, 1) if isinstance(decoding, Generate) else 1,
        "eos_token_id": sorted(lm.eos_ids) or None,
        "pad_token_id": lm.pad_id,
        # the native engine decodes the raw logits: neutralise processors a checkpoint's generation config may set
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "num_beams": 1,
    }
    if isinstance(decoding, Generate) and decoding.temperature > 0:
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_k=0, top_p=1.0)
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)  # batches of one (see NNsightExecutor): the seed is this scope's alone
    else:
        kwargs.update(do_sample=False)
    return kwargs


def generated_ids(nm: NNsightModel, sequences: torch.Tensor, row: int, width: int, decoding: Any) -> list[int]:
    """Row ``row``'s new tokens after the padded prompt width, up to the first end-of-sequence token."""
    generated: list[int] = []
    if isinstance(decoding, Generate):
        for token in sequences[row, width : width + decoding.max_new_tokens].tolist():
            if token in nm.handle.eos_ids:
                break
            generated.append(int(token))
    return generated


TargetItem = tuple[list[int], Location, list[int], torch.Tensor, str]  # ids, location, positions, vectors, mode


def decode_patched(nm: NNsightModel, items: Sequence[TargetItem], decoding: Any) -> list[RunOutput]:
    """Run one batch of patched targets ``(ids, location, positions, vectors, mode)``."""
    blocks, envoy = blocks_envoy(nm), nm.envoy  # the block names no wrapper: it would ship by value, backend and all
    kwargs = {**trace_kwargs(nm, "target"), **generate_kwargs(nm, decoding)}
    nnsight = require_nnsight()
    with envoy.generate(**kwargs) as tracer:
        logits = nnsight.save({})  # keyed by row: invokes may finish in any order
        for row, (ids, location, cols, vectors, mode) in enumerate(items):
            with tracer.invoke(ids):
                write_patch(blocks, location, len(ids), cols, vectors, mode)
                logits[row] = envoy.output.logits[0, -1].detach().float().cpu()
        with tracer.invoke():
            sequences = nnsight.save(tracer.result.detach().cpu())
    width = max(len(ids) for ids, *_ in items)
    return [RunOutput(logits[row], generated_ids(nm, sequences, row, width, decoding)) for row in range(len(items))]


def decode_batches(group: DecodeGroup, batch_size: int) -> list[list[int]]:
    """The steps of a decode group in batches; seeded sampling runs one step a batch, so that a sample
    depends on its own seed only (Hugging Face's sampler draws from one global generator)."""
    size = 1 if group.temperature > 0 and group.seed is not None else batch_size
    return [list(part) for part in chunks(group.steps, size)]


__all__ = [
    "capture_nnsight",
    "check_models_ready",
    "decode_batches",
    "decode_patched",
    "generate_kwargs",
    "generated_ids",
    "read_states",
    "trace_kwargs",
    "write_patch",
]
