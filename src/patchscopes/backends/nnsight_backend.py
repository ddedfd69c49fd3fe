"""Patchscopes compiled into nnsight traces: run locally, as a serialised round trip, or on NDIF.

A Patchscope becomes two nnsight blocks, a ``trace`` and a ``generate``, with one invoke per prompt:

1. *source*: read the block outputs (or the input of block 0 for ``"embeddings"``) at the source
   positions, every needed layer in one pass that stops after the deepest one;
2. the mapping runs on the client, where its weights are;
3. *target*: write the mapped vectors into the target layer's output at the target positions (replace or
   add; on the prefill pass only, since an invoke's interventions touch the first forward), read the
   next-token logits, and generate greedily (``max_new_tokens=1`` for :class:`NextToken`).

The blocks reference nothing but torch and their own variables, so nnsight can ship them to NDIF as
they are. The results are the :class:`~patchscopes.scope.PatchscopeResult` objects of
:func:`patchscopes.scope.run_many`, equal to the native engine's (see ``tests/test_backends_nnsight.py``).

    >>> from patchscopes import load_model
    >>> from patchscopes.presets import TOKEN_IDENTITY
    >>> from patchscopes.backends.nnsight_backend import run_many_nnsight
    >>> lm = load_model("SmolLM2-135M")                                          # doctest: +SKIP
    >>> scope = TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=6, position=-1)  # doctest: +SKIP
    >>> [result] = run_many_nnsight([scope], lm)                                 # doctest: +SKIP
    >>> result.top_tokens[:3]                                                    # doctest: +SKIP
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from patchscopes.backends.devices import apply_mapping, execution_device, layer_device
from patchscopes.backends.errors import BackendError
from patchscopes.batching import chunks
from patchscopes.errors import MappingError
from patchscopes.models.loading import ModelHandle
from patchscopes.scope import Generate, Patchscope, PatchscopeResult, _resolve, _Resolved, _result

Remote = bool | str  # False: in this process; True: NDIF; "local": NDIF's serialisation, run here


@dataclass
class NNsightModel:
    """A model handle (tokenizer, adapter, name) together with its nnsight wrapper.

    ``remote`` says where its traces run: ``False`` here, ``True`` on NDIF, ``"local"`` through the exact
    serialise/deserialise path of a remote request but executed here (a dry run of the request).
    ``backend``, when given, makes the nnsight backend of each trace instead (used to record requests).
    """

    handle: ModelHandle
    envoy: Any
    remote: Remote = False
    backend: Callable[[Any, str], Any] | None = None  # (envoy, "source"|"target") -> an nnsight Backend

    @property
    def name(self) -> str:
        return self.handle.name


# id(model) -> its nnsight wrapper, while some NNsightModel holds it (the wrapper keeps the model alive, so the
# id cannot be reused meanwhile); weak, so that wrapping never keeps a model in memory
_WRAPPERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def require_nnsight() -> Any:
    """Import nnsight, or fail with how to install it."""
    try:
        import nnsight
    except ImportError as exc:  # pragma: no cover - nnsight is a dependency of this backend
        raise BackendError("the nnsight backend needs the nnsight package: pip install nnsight") from exc
    return nnsight


def wrap(lm: ModelHandle, remote: Remote = False) -> NNsightModel:
    """Wrap a loaded model for the nnsight backend (reused while a wrapper of the same model is alive).

    The tokenizer is copied, since nnsight sets padding options on the one it holds.

    >>> nm = wrap(load_model("SmolLM2-135M"))   # doctest: +SKIP
    """
    require_nnsight()
    from nnsight.modeling.transformers import TransformersModel

    envoy = _WRAPPERS.get(id(lm.model))
    if envoy is None:
        first = next(lm.model.parameters(), None)
        cls = TransformersModel
        if first is not None and first.device.type == "meta" and lm.device.type != "meta":
            cls = _offloaded_class()  # embedding offloaded: nnsight would send the inputs to the meta device
        envoy = cls(lm.model, tokenizer=copy.deepcopy(lm.tokenizer))
        if getattr(envoy.tokenizer, "padding_side", "left") != "left":
            raise BackendError(f"nnsight pads {lm.name} on the {envoy.tokenizer.padding_side}; the backend needs left padding")
        _WRAPPERS[id(lm.model)] = envoy
    return NNsightModel(lm, envoy, remote)


def _offloaded_class() -> type:
    """nnsight's wrapper, sending inputs to where the embedding runs rather than to the first weight's device."""
    from nnsight.modeling.transformers import TransformersModel

    class OffloadedTransformersModel(TransformersModel):
        @property
        def device(self) -> torch.device:
            return execution_device(self._module.get_input_embeddings())

        def _remoteable_class(self) -> type:
            return TransformersModel

    return OffloadedTransformersModel


def as_nnsight(model: ModelHandle | NNsightModel, remote: Remote | None = None) -> NNsightModel:
    """An :class:`NNsightModel` for a handle or an existing wrapper (``remote`` overrides its setting)."""
    if isinstance(model, NNsightModel):
        return model if remote is None else NNsightModel(model.handle, model.envoy, remote, model.backend)
    if isinstance(model, ModelHandle):
        return wrap(model, remote=False if remote is None else remote)
    raise BackendError(f"expected a ModelHandle or NNsightModel, got {type(model).__name__}; load one with load_model(name)")


def blocks_envoy(nm: NNsightModel) -> Any:
    """The envoy of the model's block list, found through the adapter's dotted ``blocks`` path."""
    path = nm.handle.adapter.spec.blocks
    for alternative in path.split("|"):
        node = nm.envoy
        try:
            for part in alternative.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise BackendError(f"the nnsight wrapper of {nm.name} has no module at {path!r}; check the adapter's ArchSpec.blocks")


def _trace_kwargs(nm: NNsightModel, kind: str) -> dict[str, Any]:
    if nm.backend is not None:
        return {"backend": nm.backend(nm.envoy, kind)}
    if nm.remote is True:  # the key, checked for every request (the hosted list once per run_many_nnsight)
        from patchscopes.backends.remote import api_key

        require_nnsight().CONFIG.API.APIKEY = api_key()
    return {"remote": nm.remote} if nm.remote else {}


def check_models_ready(models: Sequence[NNsightModel]) -> None:
    """Before a real remote run, once per call: each remote model's key is set and the model is hosted."""
    for nm in {id(m): m for m in models}.values():
        if nm.remote is True and nm.backend is None:
            from patchscopes.backends.remote import check_remote_ready

            check_remote_ready(nm)


def capture_nnsight(
    nm: NNsightModel,
    token_ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Like :func:`patchscopes.capture.capture`, through nnsight: ``[len(layers), n_pos, d]`` per prompt (CPU)."""
    order = list(layers)
    visit = sorted(set(order))  # nnsight serves locations in execution order; embeddings (-1) come first
    deepest = visit[-1]
    blocks = blocks_envoy(nm)
    envoy = nm.envoy
    kwargs = _trace_kwargs(nm, "source")
    nnsight = require_nnsight()
    out: list[torch.Tensor] = []
    for group in chunks(list(range(len(token_ids))), batch_size):
        items = [(list(token_ids[i]), list(positions[i])) for i in group]
        with envoy.trace(**kwargs) as tracer:
            saved = nnsight.save({})  # keyed by row: invokes may finish in any order
            for row, (ids, cols) in enumerate(items):
                with tracer.invoke(ids):
                    seen = {}
                    for layer in visit:
                        if layer < 0:
                            h = blocks[0].input
                        else:
                            o = blocks[layer].output
                            h = o[0] if isinstance(o, tuple) else o
                        pad = h.shape[1] - len(ids)
                        seen[layer] = h[0, [pad + p for p in cols]].detach().cpu()
                    saved[row] = torch.stack([seen[layer] for layer in order])
            with tracer.invoke():
                _ = blocks[0].input if deepest < 0 else blocks[deepest].output
                tracer.stop()
        out.extend(saved[row] for row in range(len(items)))
    return out


def _patch_device(nm: NNsightModel, layer: int) -> torch.device:
    """Where a patch for ``layer`` should wait: that block's execution device; CPU for a remote (meta) model."""
    device = layer_device(nm.handle, layer)
    return torch.device("cpu") if device.type == "meta" else device


def _map(r: _Resolved, h: torch.Tensor, tlm: ModelHandle, device: torch.device) -> torch.Tensor:
    """Apply the mapping where its weights live, then move the result to the target layer's device."""
    if h.device.type == "meta":
        raise BackendError("the source states are on the meta device: capture a remote source through NDIF (remote=True)")
    mapped = apply_mapping(r.mapping, h, device)
    if mapped.shape[-1] != tlm.hidden_size:
        raise MappingError(f"the mapping returns size {mapped.shape[-1]} but {tlm.name} has hidden size {tlm.hidden_size}")
    return mapped


def _generate_kwargs(nm: NNsightModel, decoding: Any) -> dict[str, Any]:
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
            torch.manual_seed(decoding.seed)
    else:
        kwargs.update(do_sample=False)
    return kwargs


def write_patch(blocks: Any, layer: int, n_ids: int, cols: Sequence[int], vectors: torch.Tensor, mode: str) -> None:
    """Inside an nnsight invoke: write ``vectors`` at block ``layer`` (-1: the input of block 0), left padding counted."""
    if layer < 0:
        h = blocks[0].input
    else:
        o = blocks[layer].output
        h = o[0] if isinstance(o, tuple) else o
    where = [h.shape[1] - n_ids + p for p in cols]
    v = vectors.to(device=h.device, dtype=h.dtype)
    if mode == "replace":
        h[:, where] = v
    else:
        h[:, where] += v


TargetItem = tuple[list[int], int, list[int], torch.Tensor, str]  # ids, resolved layer, positions, vectors, mode


def decode_patched(nm: NNsightModel, items: Sequence[TargetItem], decoding: Any) -> list[tuple[torch.Tensor, list[int]]]:
    """Run one batch of patched targets ``(ids, layer, positions, vectors, mode)``; return ``(logits, generated)``."""
    blocks = blocks_envoy(nm)
    envoy = nm.envoy
    kwargs = {**_trace_kwargs(nm, "target"), **_generate_kwargs(nm, decoding)}
    nnsight = require_nnsight()
    with envoy.generate(**kwargs) as tracer:
        logits = nnsight.save({})  # keyed by row: invokes may finish in any order
        for row, (ids, layer, cols, vectors, mode) in enumerate(items):
            with tracer.invoke(ids):
                write_patch(blocks, layer, len(ids), cols, vectors, mode)
                logits[row] = envoy.output.logits[0, -1].detach().float().cpu()
        with tracer.invoke():
            sequences = nnsight.save(tracer.result.detach().cpu())
    width = max(len(ids) for ids, *_ in items)
    eos = nm.handle.eos_ids
    outputs = []
    for row in range(len(items)):
        lg = logits[row]
        generated: list[int] = []
        if isinstance(decoding, Generate) and decoding.max_new_tokens > 0:
            for token in sequences[row, width : width + decoding.max_new_tokens].tolist():
                if token in eos:
                    break
                generated.append(int(token))
        outputs.append((lg, generated))
    return outputs


def run_many_nnsight(
    scopes: Sequence[Patchscope],
    model: ModelHandle | NNsightModel,
    target_model: ModelHandle | NNsightModel | None = None,
    batch_size: int = 16,
    remote: Remote | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[PatchscopeResult]:
    """Run Patchscopes through nnsight; same arguments and results as :func:`patchscopes.scope.run_many`.

    ``remote`` (``True`` for NDIF, ``"local"`` for a serialised dry run) overrides the wrappers' own setting;
    ``on_batch(n)`` is called after each target batch of ``n`` Patchscopes (for progress bars).

    >>> results = run_many_nnsight(scopes, lm, batch_size=8)                 # doctest: +SKIP
    >>> results = run_many_nnsight(scopes, ndif_model("meta-llama/Llama-3.1-8B"))  # doctest: +SKIP
    """
    src = as_nnsight(model, remote)
    tgt = src if target_model is None else as_nnsight(target_model, remote)
    lm, tlm = src.handle, tgt.handle
    check_models_ready([src, tgt])
    resolved = [_resolve(s, lm, tlm) for s in scopes]
    keys: dict[tuple, set[int]] = {}
    for r in resolved:
        keys.setdefault((tuple(r.src_ids), tuple(r.src_positions)), set()).add(r.src_layer)
    by_layers: dict[tuple[int, ...], list[tuple]] = {}
    for k, needed in keys.items():
        by_layers.setdefault(tuple(sorted(needed)), []).append(k)
    states: dict[tuple, torch.Tensor] = {}
    for layers, group in by_layers.items():
        captured = capture_nnsight(src, [list(k[0]) for k in group], [list(k[1]) for k in group], list(layers), batch_size)
        for k, tensor in zip(group, captured):
            for i, layer in enumerate(layers):
                states[(k, layer)] = tensor[i]
    patches = []
    for r in resolved:
        h = states[((tuple(r.src_ids), tuple(r.src_positions)), r.src_layer)]
        mapped = _map(r, h, tlm, _patch_device(tgt, r.tgt_layer))
        patches.append((list(r.tgt_ids), r.tgt_layer, list(r.tgt_positions), mapped, r.scope.mode))
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(resolved):
        groups.setdefault(r.scope.decoding, []).append(i)
    for decoding, idx in groups.items():
        for part in chunks(idx, batch_size):
            outs = decode_patched(tgt, [patches[i] for i in part], decoding)
            for i, (logits, generated) in zip(part, outs):
                results[i] = _result(resolved[i], logits, generated, lm, tlm, decoding.top_k)
            if on_batch is not None:
                on_batch(len(part))
    return [r for r in results if r is not None]


__all__ = [
    "NNsightModel",
    "as_nnsight",
    "blocks_envoy",
    "capture_nnsight",
    "check_models_ready",
    "decode_patched",
    "run_many_nnsight",
    "wrap",
]
