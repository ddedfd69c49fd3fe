"""The fast sweep engine: shared target prefixes, skipped layers, batched variants.

Many Patchscope variants share one target prompt and differ only in the vector written at (ℓ*, i*). Two
facts make most of their work common:

- a patch at position i* cannot change anything before i*, so the target's prefix ``T[:i*]`` is run once
  and its KV cache is shared by every variant;
- a patch at layer ℓ* cannot change blocks ``0..ℓ*`` at the positions from i* on, so those blocks are not
  run again: they are *replayed* — a stand-in module returns the stored block output (with the patch
  applied at ℓ*) and writes the stored keys and values into the cache.

So a variant costs only blocks ``ℓ*+1..L−1`` on the suffix ``T[i*:]`` (usually one token), and the
variants of one (target, i*, ℓ*) run together as one batch. Generation then continues from a cache that
is exactly the one a full patched forward would have built. The plain engine
(:func:`patchscopes.patching.run_patched`) stays the reference; ``tests/test_engine.py`` holds the two
equal on several architectures.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchscopes.capture import EMBED_INDEX, hidden_of, layer_hooks, with_hidden
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import PatchedRun, RunOutput, continue_generation

#: Architectures whose blocks are known to replay exactly (checked by tests/test_engine.py).
FAST_ARCHITECTURES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gpt2", "gpt_neox", "phi", "gptj", "opt"}
)


def supports_fast(lm: ModelHandle) -> bool:
    """Whether the fast engine may run this model (architecture verified, default dynamic cache)."""
    model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
    return model_type in FAST_ARCHITECTURES


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}")
    return list(layers)


@dataclass
class _TargetState:
    """What one target prompt shares with all its variants at one suffix start i*."""

    prefix_cache: Any  # cache after T[:i*] (None when i* == 0)
    suffix_hidden: dict[int, torch.Tensor]  # layer → [S, d] unpatched block output at T[i*:]
    suffix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → keys, values [1, h, S, hd]
    output_template: dict[int, Any]  # layer → an output of that block (to mimic its structure)


def _expand_cache(cache: Any, rows: int) -> Any:
    expanded = copy.deepcopy(cache)
    for layer in _cache_layers(expanded):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:]).contiguous()
            layer.values = layer.values.expand(rows, *layer.values.shape[1:]).contiguous()
    return expanded


@torch.no_grad()
def _prepare_target(lm: ModelHandle, ids: Sequence[int], start: int) -> _TargetState:
    """Run T[:start] once (its cache), then T[start:] unpatched on top, keeping per-layer outputs and KV."""
    device = lm.device
    prefix_cache = None
    if start > 0:
        out = lm.model(
            input_ids=torch.tensor([list(ids[:start])], device=device),
            position_ids=torch.arange(start, device=device)[None],
            use_cache=True,
        )
        prefix_cache = out.past_key_values
    suffix = list(ids[start:])
    hidden: dict[int, torch.Tensor] = {}
    templates: dict[int, Any] = {}
    handles = []
    for index, block in enumerate(lm.adapter.blocks):

        def grab(module: nn.Module, args: tuple, output: Any, index: int = index) -> None:
            hidden[index] = hidden_of(output)[0].detach().clone()
            templates[index] = output

        handles.append(block.register_forward_hook(grab))
    try:
        cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else None
        out = lm.model(
            input_ids=torch.tensor([suffix], device=device),
            position_ids=torch.arange(start, len(ids), device=device)[None],
            past_key_values=cache,
            use_cache=True,
        )
    finally:
        for h in handles:
            h.remove()
    kv = {}
    for index, layer in enumerate(_cache_layers(out.past_key_values)):
        kv[index] = (layer.keys[..., -len(suffix) :, :].clone(), layer.values[..., -len(suffix) :, :].clone())
    return _TargetState(prefix_cache, hidden, kv, templates)


class _Replay(nn.Module):
    """Stands in for block ``index``: writes the stored keys/values, returns the stored (patched) output."""

    def __init__(
        self, original: nn.Module, index: int, output: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], template: Any
    ):
        super().__init__()
        self.original = original
        self.index = index
        self.output = output
        self.kv = kv
        self.template = template

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value", kwargs.get("layer_past")))
        if cache is None:
            cache = next((a for a in args if hasattr(a, "update") and hasattr(a, "layers")), None)
        if cache is None:
            raise RuntimeError("replayed block received no cache; the fast engine cannot run this architecture")
        rows = hidden_states.shape[0]
        keys, values = self.kv
        cache.update(keys.expand(rows, *keys.shape[1:]), values.expand(rows, *values.shape[1:]), self.index)
        return with_hidden(self.template, self.output)


@contextmanager
def _replaying(blocks: nn.ModuleList, replays: dict[int, _Replay]) -> Iterator[None]:
    originals: dict[int, nn.Module] = {i: blocks[i] for i in replays}
    try:
        for i, replay in replays.items():
            blocks[i] = replay
        yield
    finally:
        for i, original in originals.items():
            blocks[i] = original


@torch.no_grad()
def _run_group(
    lm: ModelHandle,
    ids: Sequence[int],
    start: int,
    layer: int,
    runs: Sequence[PatchedRun],
    state: _TargetState,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
) -> list[RunOutput]:
    """All variants patching ``layer`` of one target at positions ≥ ``start``, as one batch."""
    device, rows, suffix = lm.device, len(runs), list(ids[start:])
    n_suffix = len(suffix)
    patched = state.suffix_hidden[layer].to(device).expand(rows, n_suffix, -1).clone()
    for row, run in enumerate(runs):
        for patch in run.patches:
            cols = torch.tensor([p - start for p in patch.positions], device=device)
            v = patch.vectors.to(device=device, dtype=patched.dtype)
            patched[row, cols] = v if patch.mode == "replace" else patched[row, cols] + v
    replays = {}
    for index in range(layer + 1):
        out = patched if index == layer else state.suffix_hidden[index].to(device).expand(rows, n_suffix, -1)
        replays[index] = _Replay(lm.adapter.blocks[index], index, out, state.suffix_kv[index], state.output_template[index])
    cache = _expand_cache(state.prefix_cache, rows) if state.prefix_cache is not None else None
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.model.config)  # type: ignore[arg-type]
    positions = torch.arange(start, len(ids), device=device)[None].expand(rows, -1)
    with _replaying(lm.adapter.blocks, replays):
        out = lm.model(
            input_ids=torch.tensor([suffix], device=device).expand(rows, -1),
            position_ids=positions,
            attention_mask=torch.ones(rows, len(ids), dtype=torch.long, device=device),
            past_key_values=cache,
            use_cache=True,
            **({"logits_to_keep": 1} if _accepts_logits_to_keep(lm) else {}),
        )
    logits = out.logits[:, -1].float()
    generated: list[list[int]] = [[] for _ in runs]
    if max_new_tokens > 0:
        mask = torch.ones(rows, len(ids), dtype=torch.long, device=device)
        generated = continue_generation(
            lm, logits, out.past_key_values, mask, positions[:, -1:], max_new_tokens, temperature, generator
        )
    return [RunOutput(logits=logits[i].cpu(), generated=generated[i]) for i in range(rows)]


def _accepts_logits_to_keep(lm: ModelHandle) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(lm.model.forward).parameters
    except (TypeError, ValueError):
        return False


def fast_eligible(run: PatchedRun) -> bool:
    """One patch at one block layer (not the embeddings): what the fast path handles."""
    return len(run.patches) == 1 and run.patches[0].layer != EMBED_INDEX


def run_patched_fast(
    lm: ModelHandle,
    runs: Sequence[PatchedRun],
    max_new_tokens: int = 0,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[RunOutput]:
    """Same contract as :func:`patchscopes.patching.run_patched`, computed with shared prefixes and skipped layers.

    Runs that the fast path does not cover (several patches, an embeddings patch) must go through
    ``run_patched``; :func:`patchscopes.scope.run_many` routes them.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        if not fast_eligible(run):
            raise ValueError("run_patched_fast handles runs with exactly one block-layer patch")
        patch = run.patches[0]
        groups.setdefault((tuple(run.ids), min(patch.positions), patch.layer), []).append(i)
    results: list[RunOutput | None] = [None] * len(runs)
    states: dict[tuple, _TargetState] = {}
    for ids, start, layer in sorted(groups):
        members = groups[(ids, start, layer)]
        key = (ids, start)
        if key not in states:
            states.clear()  # keep one target's state in memory at a time (groups arrive target by target)
            states[key] = _prepare_target(lm, ids, start)
        for offset in range(0, len(members), batch_size):
            chunk = members[offset : offset + batch_size]
            outs = _run_group(
                lm, ids, start, layer, [runs[i] for i in chunk], states[key], max_new_tokens, temperature, generator
            )
            for i, out in zip(chunk, outs):
                results[i] = out
            if on_batch is not None:
                on_batch(len(chunk))
    return [r for r in results if r is not None]


__all__ = ["FAST_ARCHITECTURES", "fast_eligible", "run_patched_fast", "supports_fast", "layer_hooks"]
