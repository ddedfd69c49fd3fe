"""The fast sweep engine: shared target prefixes, skipped layers, batched variants.

Many Patchscope variants share one target prompt and differ only in the vector written at (ℓ*, i*). Two
facts make most of their work common:

- a patch at position i* cannot change anything before i*, so the target's prefix ``T[:i*]`` is run once
  and its KV cache is shared by every variant;
- a patch at layer ℓ* cannot change blocks ``0..ℓ*`` at the positions from i* on, so those blocks are not
  run again: they are *replayed* — a stand-in module returns the stored block output (with the patch
  applied at ℓ*) and writes the stored keys and values into the cache.

So a variant costs only blocks ``ℓ*+1..L−1`` on the suffix ``T[i*:]`` (usually one token). The variants of
one (target, i*) run together as a *wave*: sorted by ℓ*, each block k runs once on every row patched below k,
while the rows patched at or above k replay it, so rows join the batch at their ℓ* and ride through the
remaining blocks together. Generation then continues, for the whole wave at once, from a cache that is
exactly the one a full patched forward would have built. The plain engine
(:func:`patchscopes.patching.run_patched`) stays the reference; ``tests/test_engine.py`` holds the two
equal on several architectures.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchscopes import compat
from patchscopes.capture import capture
from patchscopes.errors import PatchscopeError
from patchscopes.hooks import hidden_of, with_hidden, write
from patchscopes.layers import is_block, resolve_layer
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import (
    Patch,
    PatchedRun,
    RunOutput,
    check_patches_landed,
    continue_generation,
    generators,
    run_patched,
)


class ReplayError(RuntimeError):
    """A block could not be replayed (it received no cache it could write to)."""


@dataclass
class _TargetState:
    """What one target prompt shares with all its variants at one suffix start i*."""

    prefix_cache: Any  # cache after T[:i*] (None when i* == 0)
    suffix_hidden: dict[int, torch.Tensor]  # layer → [S, d] unpatched block output at T[i*:]
    suffix_kv: dict[int, tuple[torch.Tensor, torch.Tensor] | None]  # layer → keys, values [1, h, S, hd]; None: wrote none
    output_template: dict[int, Any]  # layer → an output of that block (to mimic its structure)


def _expand_cache(cache: Any, rows: int) -> Any:
    """``cache`` widened to ``rows`` identical rows without copying: each layer's keys are an expanded view.

    The cache's layers grow by concatenation, which writes new tensors, so the shared prefix is never written
    to and every wave can widen the same prefix cache.
    """
    expanded = copy.copy(cache)
    expanded.layers = [copy.copy(layer) for layer in compat.cache_layers(cache)]
    for layer in expanded.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return expanded


def _layer_rows(layer: Any, rows: slice) -> Any:
    """A shallow copy of one cache layer holding only ``rows`` of its batch (the same state otherwise)."""
    part = copy.copy(layer)
    if getattr(layer, "keys", None) is not None and layer.keys.numel():
        part.keys, part.values = layer.keys[rows], layer.values[rows]
    return part


def _join_layer_rows(head: Any, tail: Any) -> Any:
    """One cache layer from two that took the same updates on different rows (``head``'s rows first)."""
    joined = copy.copy(head)
    joined.keys = torch.cat([head.keys, tail.keys], dim=0)
    joined.values = torch.cat([head.values, tail.values], dim=0)
    return joined


def _leading_rows(value: Any, rows: int, n: int) -> Any:
    """``value`` with every batch-sized tensor cut to its first ``n`` rows.

    A tensor is batch-sized when it has two or more dims and ``rows`` leads them, or a multiple of ``rows``
    does, batch-major (as Bloom's ALiBi bias folds the heads into the batch: ``[rows × heads, 1, T]``).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] % rows:
            return value
        per_row = value.shape[0] // rows
        return value[: n * per_row]
    if isinstance(value, tuple):
        return tuple(_leading_rows(v, rows, n) for v in value)
    if isinstance(value, list):
        return [_leading_rows(v, rows, n) for v in value]
    if isinstance(value, dict):
        return {k: _leading_rows(v, rows, n) for k, v in value.items()}
    return value


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
            **compat.logits_to_keep_kwargs(lm.model, 1),  # only the cache is kept: no full-vocabulary logits per position
        )
        prefix_cache = compat.output_cache(out)
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
        cache = _expand_cache(prefix_cache, 1) if prefix_cache is not None else compat.new_cache(lm.model)
        out = lm.model(
            input_ids=torch.tensor([suffix], device=device),
            position_ids=torch.arange(start, len(ids), device=device)[None],
            use_cache=True,
            **compat.cache_kwargs(lm.model, cache),
            **compat.logits_to_keep_kwargs(lm.model, 1),
        )
    finally:
        for h in handles:
            h.remove()
    kv: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for index, layer in enumerate(compat.cache_layers(compat.output_cache(out))):
        if getattr(layer, "keys", None) is None:  # a block that skipped itself (mllama's cross-attention on text)
            kv[index] = None
            continue
        kv[index] = (layer.keys[..., -len(suffix) :, :].clone(), layer.values[..., -len(suffix) :, :].clone())
    return _TargetState(prefix_cache, hidden, kv, templates)


class _WaveBlock(nn.Module):
    """Stands in for block ``index`` in a wave: the first ``active`` rows run it, the others are replayed.

    Rows are sorted by their patch layer ℓ*. The active rows (ℓ* < ``index``) carry a patch from below, so the
    block runs on them, on their share of the cache. The other rows see this block's unpatched inputs: they
    get the stored keys and values and the stored output ``stored`` (patched where ℓ* = ``index``).
    Without ``keep_cache`` (no generation follows) the replayed rows' keys and values, which no later block
    reads, are not written.
    """

    def __init__(
        self,
        original: nn.Module,
        index: int,
        active: int,
        stored: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        template: Any,
        keep_cache: bool = True,
    ):
        super().__init__()
        self.keep_cache = keep_cache
        self.original = original
        self.index = index
        self.active = active
        self.stored = stored
        self.kv = kv
        self.template = template
        self.ran = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    def _replay(self, cache: Any, rows: int) -> None:
        if self.kv is None:  # the block wrote no keys and values in the unpatched run, so its replay writes none
            return
        keys, values = self.kv
        compat.append_kv(cache, keys.expand(rows, *keys.shape[1:]), values.expand(rows, *values.shape[1:]), self.index)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = compat.find_cache(args, kwargs)
        if cache is None:
            raise ReplayError(f"block {self.index} received no KV cache to replay into")
        self.ran = True
        rows, n = hidden_states.shape[0], self.active
        if n == 0:
            if self.keep_cache:
                self._replay(cache, rows)
            return with_hidden(self.template, self.stored)
        layers = cache.layers
        whole = layers[self.index]
        head, tail = _layer_rows(whole, slice(0, n)), _layer_rows(whole, slice(n, rows))
        try:
            layers[self.index] = head
            out = self.original(hidden_states[:n], *_leading_rows(args, rows, n), **_leading_rows(kwargs, rows, n))
            if self.keep_cache:
                layers[self.index] = tail
                self._replay(cache, rows - n)
        except BaseException:
            layers[self.index] = whole
            raise
        if self.keep_cache:
            layers[self.index] = _join_layer_rows(head, tail)
        return with_hidden(out, torch.cat([hidden_of(out), self.stored], dim=0))


@contextmanager
def _standing_in(blocks: nn.ModuleList, stand_ins: dict[int, _WaveBlock]) -> Iterator[None]:
    originals: dict[int, nn.Module] = {i: blocks[i] for i in stand_ins}
    try:
        for i, stand_in in stand_ins.items():
            blocks[i] = stand_in
        yield
    finally:
        for i, original in originals.items():
            blocks[i] = original


def _stand_ins(
    lm: ModelHandle, start: int, layers: Sequence[int], runs: Sequence[PatchedRun], state: _TargetState, keep_cache: bool
) -> dict[int, _WaveBlock]:
    """The stand-in of every block up to the highest ℓ*, for rows sorted by their patch layer ``layers``."""
    device, rows = lm.device, len(runs)
    n_suffix = state.suffix_hidden[0].shape[0]
    stand_ins = {}
    for index in range(max(layers) + 1):
        if index not in state.suffix_hidden:  # the block skipped itself in the unpatched run (mllama's cross-attention
            continue  # on text); it stays as it is, and patching there is refused as a block that did not run
        active = sum(1 for layer in layers if layer < index)
        stored = state.suffix_hidden[index].to(device).expand(rows - active, n_suffix, -1)
        patched_here = [row for row in range(active, rows) if layers[row] == index]
        if patched_here:
            stored = stored.clone()
            for row in patched_here:
                for patch in runs[row].patches:
                    at = (row - active, torch.tensor([p - start for p in patch.positions], device=device))
                    write(stored, at, patch.vectors, patch.mode)
        block = lm.adapter.blocks[index]
        stand_ins[index] = _WaveBlock(
            block, index, active, stored, state.suffix_kv[index], state.output_template[index], keep_cache
        )
    return stand_ins


@torch.no_grad()
def _run_wave(
    lm: ModelHandle,
    ids: Sequence[int],
    start: int,
    layers: Sequence[int],
    runs: Sequence[PatchedRun],
    state: _TargetState,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
) -> list[RunOutput]:
    """Variants of one target patched at positions ≥ ``start``, sorted by patch layer ``layers``, as one batch.

    Block k runs once for every row whose patch sits below k; the rows patched at or above k replay it.
    """
    device, rows, suffix = lm.device, len(runs), list(ids[start:])
    stand_ins = _stand_ins(lm, start, layers, runs, state, keep_cache=max_new_tokens > 0)
    cache = _expand_cache(state.prefix_cache, rows) if state.prefix_cache is not None else compat.new_cache(lm.model)
    positions = torch.arange(start, len(ids), device=device)[None].expand(rows, -1)
    with _standing_in(lm.adapter.blocks, stand_ins):
        out = lm.model(
            input_ids=torch.tensor([suffix], device=device).expand(rows, -1),
            position_ids=positions,
            attention_mask=torch.ones(rows, len(ids), dtype=torch.long, device=device),
            use_cache=True,
            **compat.cache_kwargs(lm.model, cache),
            **compat.logits_to_keep_kwargs(lm.model, 1),
        )
    check_patches_landed(lm, set(layers), {i for i, stand_in in stand_ins.items() if stand_in.ran})
    logits = out.logits[:, -1].float()
    generated: list[list[int]] = [[] for _ in runs]
    if max_new_tokens > 0:
        mask = torch.ones(rows, len(ids), dtype=torch.long, device=device)
        generated = continue_generation(
            lm, logits, compat.output_cache(out), mask, positions[:, -1:], max_new_tokens, temperature, generators(seed, rows)
        )
    return [RunOutput(logits=logits[i].cpu(), generated=generated[i]) for i in range(rows)]


def wave_rows(lm: ModelHandle, state: _TargetState, tokens: int, batch_size: int, budget_bytes: int = 512 << 20) -> int:
    """How many variants one wave runs at once: as many as fit ``budget_bytes``, at least ``batch_size``.

    A row holds its own KV cache (the prefix's is widened into every row by the first update), ``tokens``
    positions in every layer at the size the target's own cache has, and one row of next-token logits; the
    cap of 1,024 rows is past the point where the matmuls reach full speed.
    """
    per_token = sum(kv[0][0, ..., :1, :].nbytes + kv[1][0, ..., :1, :].nbytes for kv in state.suffix_kv.values() if kv)
    per_row = per_token * tokens + 4 * lm.vocab_size
    return max(batch_size, min(1024, budget_bytes // max(1, per_row)))


#: model → {(dtype, device): None when the self-check passed, else why it failed}
_CHECKS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], str | None]] = weakref.WeakKeyDictionary()

PROBE_TEXTS = ("The capital of France is Paris, and the capital of Japan is", "cat -> cat; 1135 -> 1135; hello ->")


def check_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """How far fast and plain logits may differ: fp32 reduction-order noise, scaled to the logits' size.

    Half precision rounds each block output to 8 (bf16) or 11 (fp16) mantissa bits, and the two engines
    round at different points (the fast one runs other matmul shapes), so its bound is wider.
    """
    scale = max(1.0, float(logits.abs().max()))
    if dtype == torch.float32 or dtype == torch.float64:
        return 1e-3 * scale
    return 0.1 * scale


def _probe_runs(lm: ModelHandle) -> list[PatchedRun]:
    """A few single-patch variants over different layers and suffix lengths, with vectors from another text."""
    target = lm.tokenize(PROBE_TEXTS[0]).ids[:12]
    source = lm.tokenize(PROBE_TEXTS[1]).ids[:12]
    layers = sorted({0, lm.n_layers // 2, lm.n_layers - 1})
    [states] = capture(lm, [source], [[len(source) - 1]], layers)
    runs = []
    for i, layer in enumerate(layers):
        for position in (min(1, len(target) - 1), len(target) - 1):
            runs.append(PatchedRun(list(target), [Patch(layer, [position], states[i])]))
            # a second variant of the same group, so the check batches rows as a sweep does
            runs.append(PatchedRun(list(target), [Patch(layer, [position], 0.5 * states[i])]))
    return runs


@torch.no_grad()
def _cache_problem(lm: ModelHandle) -> str | None:
    """Why the model's cache cannot be replayed (no KV cache, or recurrent state in it), else None."""
    ids = torch.tensor([lm.tokenize(PROBE_TEXTS[0]).ids[:4]], device=lm.device)
    try:
        cache = compat.output_cache(lm.model(input_ids=ids, use_cache=True))
    except PatchscopeError:
        raise
    except Exception as exc:
        return f"self-check could not build a KV cache ({type(exc).__name__}: {exc})"
    if cache is None:
        return "self-check found that the model returns no KV cache to replay into"
    try:
        layers = compat.cache_layers(cache)
    except TypeError:
        return f"self-check found a {type(cache).__name__}, which has no per-layer keys and values to replay"
    recurrent = sorted({type(layer).__name__ for layer in layers if not hasattr(layer, "keys")})
    if recurrent:
        return f"self-check found recurrent state in the cache ({', '.join(recurrent)}), which the replay cannot rebuild"
    return None


def fast_engine_problem(lm: ModelHandle) -> str | None:
    """Why the fast engine cannot run ``lm`` exactly, or None when it can.

    The first call per model (and dtype, device) runs a probe through both engines: a few patched variants
    over the first, a middle and the last block, with two generated tokens and with none. It passes when the
    logits agree within :func:`check_tolerance` and the greedy tokens are identical. Later calls return the cached verdict.
    """
    key = (str(lm.dtype), str(lm.device))
    verdicts = _CHECKS.setdefault(lm.model, {})
    if key in verdicts:
        return verdicts[key]
    problem: str | None
    try:
        problem = _cache_problem(lm)
        if problem is None:
            problem = _compare_engines(lm)
    except PatchscopeError:  # the caller's own error (a cancellation, a bad input): not a verdict on the engine
        raise
    except Exception as exc:  # any other failure of the fast path on this model means: use the reference path
        problem = f"self-check failed ({type(exc).__name__}: {exc})"
    verdicts[key] = problem
    return problem


def _compare_engines(lm: ModelHandle) -> str | None:
    """Run the probe variants through both engines; why they differ, or None."""
    runs = _probe_runs(lm)
    fast = run_patched_fast(lm, runs, max_new_tokens=2)
    plain = run_patched(lm, runs, max_new_tokens=2)
    next_token = run_patched_fast(lm, runs)  # the path without generation keeps no cache for replayed rows
    worst = max(float((f.logits - p.logits).abs().max()) for f, p in zip(fast + next_token, plain + plain))
    tolerance = check_tolerance(plain[0].logits, lm.dtype)
    if not worst <= tolerance:
        return f"self-check differs from the plain engine by {worst:.3g} in the logits (tolerance {tolerance:.3g})"
    if [f.generated for f in fast] != [p.generated for p in plain]:
        return "self-check generates other greedy tokens than the plain engine"
    return None


def fast_eligible(lm: ModelHandle, run: PatchedRun) -> bool:
    """One patch at one block layer (not the embeddings), no attention restriction: what the fast path handles."""
    return len(run.patches) == 1 and run.blind is None and is_block(resolve_layer(run.patches[0].layer, lm.n_layers))


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

    The variants of one target and suffix start run as waves: sorted by patch layer, as many rows at once as
    :func:`wave_rows` allows (at least ``batch_size``). Runs that the fast path does not cover (several patches,
    an embeddings patch) must go through ``run_patched``; :class:`patchscopes.executors.ReplayExecutor` routes
    them.
    """
    waves: dict[tuple[tuple[int, ...], int], list[tuple[int, int]]] = {}
    for i, run in enumerate(runs):
        if not fast_eligible(lm, run):
            raise ValueError("run_patched_fast handles runs with exactly one block-layer patch and no attention restriction")
        patch, layer = run.patches[0], resolve_layer(run.patches[0].layer, lm.n_layers)
        assert isinstance(layer, int)  # fast_eligible: a block layer
        waves.setdefault((tuple(run.ids), min(patch.positions)), []).append((layer, i))
    results: list[RunOutput | None] = [None] * len(runs)
    for ids, start in sorted(waves):
        state = _prepare_target(lm, ids, start)
        members = sorted(waves[(ids, start)])  # by patch layer: the rows that run block k lead the batch
        rows = wave_rows(lm, state, len(ids) + max_new_tokens, batch_size)
        for offset in range(0, len(members), rows):
            chunk = members[offset : offset + rows]
            layers, chunk_runs = [layer for layer, _ in chunk], [runs[i] for _, i in chunk]
            outs = _run_wave(lm, ids, start, layers, chunk_runs, state, max_new_tokens, temperature, seed)
            for (_, i), out in zip(chunk, outs):
                results[i] = out
            if on_batch is not None:
                on_batch(len(chunk))
    return [r for r in results if r is not None]


__all__ = ["ReplayError", "check_tolerance", "fast_engine_problem", "fast_eligible", "run_patched_fast", "wave_rows"]
