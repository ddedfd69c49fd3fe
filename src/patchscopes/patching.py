"""Write hidden states into a forward pass (replace or add), on the prefill pass only, then decode.

This is the reference engine every Patchscope can run through, and the home of the one decode loop
(:func:`continue_generation`) that every native path shares::

    run = PatchedRun(ids=lm.tokenize("cat -> cat\\n?").ids,
                     patches=[Patch(layer=5, positions=[-1 % n], vectors=h[None])])
    [out] = run_patched(lm, [run], max_new_tokens=0)   # next-token logits in out.logits

A run may also restrict attention on its prefill (``PatchedRun.blind``): the multi-hop evaluation's
"π1 does not see π2" is that option, not an engine of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from patchscopes import compat
from patchscopes.batching import Batch, chunks, left_pad
from patchscopes.errors import MappingError, SpecError
from patchscopes.hooks import PatchMode, at_locations, not_run_error, write
from patchscopes.layers import LayerSpec, Location, depth, resolve_layer
from patchscopes.models.loading import ModelHandle


@dataclass
class Patch:
    """Hidden states to write at one layer (negative from the end, or ``"embeddings"``) and non-negative
    positions of the unpadded prompt."""

    layer: LayerSpec
    positions: list[int]
    vectors: torch.Tensor  # [len(positions), d]
    mode: PatchMode = "replace"

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise SpecError(f"patch mode {self.mode!r} is not 'replace' or 'add'")
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.positions):
            raise SpecError(
                f"{len(self.positions)} patch position(s) need vectors of shape [{len(self.positions)}, d], "
                f"got {tuple(self.vectors.shape)}"
            )


@dataclass
class PatchedRun:
    """One target prompt (token ids), the patches to apply to it, and an optional attention restriction.

    ``blind=(queries, keys)``: on the prefill pass, the positions in ``queries`` do not attend to those in
    ``keys`` (every other rule stays causal); generated tokens attend to everything.
    """

    ids: list[int]
    patches: list[Patch] = field(default_factory=list)
    blind: tuple[list[int], list[int]] | None = None


@dataclass
class RunOutput:
    """Next-token logits after the prompt (float32, CPU) and, when generating, the new token ids."""

    logits: torch.Tensor
    generated: list[int] = field(default_factory=list)


Entry = tuple[int, list[int], torch.Tensor, PatchMode]  # row, padded columns, vectors, mode


def patch_table(lm: ModelHandle, batch: Batch, runs: Sequence[PatchedRun]) -> dict[Location, list[Entry]]:
    """The patches of one padded batch, by resolved location; checks sizes and positions."""
    table: dict[Location, list[Entry]] = {}
    d = lm.hidden_size
    for row, run in enumerate(runs):
        for patch in run.patches:
            if patch.vectors.shape[-1] != d:
                raise MappingError(
                    f"patch vectors have size {patch.vectors.shape[-1]} but {lm.name} has hidden size {d}; "
                    "fit or pass a mapping between the two models"
                )
            for p in patch.positions:
                if not 0 <= p < len(run.ids):
                    raise SpecError(f"patch position {p} outside a target of {len(run.ids)} tokens")
            cols = [batch.padded(row, p) for p in patch.positions]
            table.setdefault(resolve_layer(patch.layer, lm.n_layers), []).append((row, cols, patch.vectors, patch.mode))
    return table


def apply_patches(hidden: torch.Tensor, entries: Sequence[Entry]) -> torch.Tensor:
    """A copy of ``hidden`` with the table's entries written."""
    hidden = hidden.clone()
    for row, cols, vectors, mode in entries:
        write(hidden, (row, torch.tensor(cols, device=hidden.device)), vectors, mode)
    return hidden


def prefill_mask(lm: ModelHandle, batch: Batch, runs: Sequence[PatchedRun]) -> torch.Tensor:
    """The prefill's attention mask: the padding mask, or a 4-D mask where some run restricts attention."""
    if all(run.blind is None for run in runs):
        return batch.attention_mask
    width = batch.width
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(len(runs), 1, 1)
    for row, run in enumerate(runs):
        pad = batch.pad[row]
        allowed[row, :, :pad] = False
        if run.blind is not None and run.blind[0] and run.blind[1]:
            queries = torch.tensor([pad + p for p in run.blind[0]])
            keys = torch.tensor([pad + p for p in run.blind[1]])
            allowed[row, queries[:, None], keys[None, :]] = False
        allowed[row, torch.arange(width), torch.arange(width)] = True  # padding rows attend to themselves (no NaN)
    return compat.additive_mask(allowed, lm.dtype).to(lm.device)


def generators(seed: int | None, rows: int) -> list[torch.Generator] | None:
    """One generator per row, each seeded alike: a row's sample never depends on its batch mates."""
    return None if seed is None else [torch.Generator().manual_seed(seed) for _ in range(rows)]


@torch.no_grad()
def continue_generation(
    lm: ModelHandle,
    logits: torch.Tensor,
    past: Any,
    mask: torch.Tensor,
    last_positions: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: Sequence[torch.Generator] | None = None,
) -> list[list[int]]:
    """The decode loop: ``max_new_tokens`` per row from next-token ``logits`` and a KV cache (unpatched steps).

    Greedy unless ``temperature > 0``; a row stops at the model's end-of-sequence token (not included) and
    leaves the batch, so the remaining rows decode without it (where the cache allows; a recurrent cache
    keeps every row). ``generator`` is one per row (see :func:`generators`), so that each row's sample
    depends on its own seed only; without it sampling draws from torch's global generator.
    """
    rows = logits.shape[0]
    eos = torch.tensor(sorted(lm.eos_ids) or [-1], device=logits.device)  # the unembedding's device
    generated: list[list[int]] = [[] for _ in range(rows)]
    live = list(range(rows))  # which row of ``generated`` each row of the batch is
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    step_logits, positions = logits, last_positions
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(step_logits / temperature, dim=-1).cpu()
            if generator is not None:
                drawn = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
                nxt = torch.cat(drawn).squeeze(-1).to(step_logits.device)
            else:
                nxt = torch.multinomial(probs, 1).squeeze(-1).to(step_logits.device)
        else:
            nxt = step_logits.argmax(-1)
        finished = torch.isin(nxt, eos)
        for row, token, stop, was_done in zip(live, nxt.tolist(), finished.tolist(), done.tolist()):
            if not was_done and not stop:
                generated[row].append(token)
        done |= finished
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            if compat.select_rows(past, keep.to(mask.device)):
                kept = keep.tolist()
                live = [live[i] for i in kept]
                generator = [generator[i] for i in kept] if generator is not None else None
                nxt, done = nxt[keep], done[keep]
                mask, positions = mask[keep.to(mask.device)], positions[keep.to(positions.device)]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        step = lm.model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **compat.cache_kwargs(lm.model, past),
        )
        past = compat.output_cache(step)
        step_logits = step.logits[:, -1].float()
    return generated


def check_patches_landed(lm: ModelHandle, wanted: set[Location], written: set[Location]) -> None:
    """A patch whose block never ran would leave the output unpatched: refuse instead of answering."""
    if wanted - written:
        raise not_run_error(lm.name, sorted(wanted - written, key=depth), "a patch there would not land")


@torch.no_grad()
def _prefill(
    lm: ModelHandle,
    batch: Batch,
    runs: Sequence[PatchedRun],
    use_cache: bool,
    read: Sequence[Location] = (),
    last_only: bool = False,
) -> tuple[Any, dict[Location, torch.Tensor]]:
    """One patched forward pass of a padded batch; returns the model output and the hidden states at ``read``."""
    table = patch_table(lm, batch, runs)
    written: set[Location] = set()
    seen: dict[Location, torch.Tensor] = {}

    def hook(location: Location, hidden: torch.Tensor) -> torch.Tensor | None:
        new = None
        if location in table:
            written.add(location)
            new = apply_patches(hidden, table[location])
        if location in read:
            seen[location] = (new if new is not None else hidden).detach().clone()
        return new

    with at_locations(lm.adapter.blocks, [*table, *read], hook):
        out = lm.model(
            input_ids=batch.input_ids,
            attention_mask=prefill_mask(lm, batch, runs),
            position_ids=batch.position_ids,
            use_cache=use_cache,
            **(compat.logits_to_keep_kwargs(lm.model, 1) if last_only else {}),
        )
    check_patches_landed(lm, set(table), written)
    return out, seen


@torch.no_grad()
def run_patched(
    lm: ModelHandle,
    runs: Sequence[PatchedRun],
    max_new_tokens: int = 0,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[RunOutput]:
    """Run each target with its patches applied on the prefill pass; return logits and generated ids.

    Generation is greedy (``temperature=0``) or sampled (each run with its own generator seeded ``seed``),
    continues from the KV cache, and stops a row at the model's end-of-sequence token. Mixed-length targets
    are left-padded with a proper attention mask and position ids.
    """
    outputs: list[RunOutput] = []
    for group in chunks(list(runs), batch_size):
        batch = left_pad([r.ids for r in group], lm.pad_id, lm.device)
        out, _ = _prefill(lm, batch, group, use_cache=max_new_tokens > 0, last_only=True)
        logits = out.logits[:, -1].float()
        generated: list[list[int]] = [[] for _ in group]
        if max_new_tokens > 0:
            generated = continue_generation(
                lm,
                logits,
                compat.output_cache(out),
                batch.attention_mask,
                batch.position_ids[:, -1:],
                max_new_tokens,
                temperature,
                generators(seed, len(group)),
            )
        for i in range(len(group)):
            outputs.append(RunOutput(logits=logits[i].cpu(), generated=generated[i]))
        if on_batch is not None:
            on_batch(len(group))
    return outputs


@torch.no_grad()
def trace(
    lm: ModelHandle,
    ids: Sequence[Sequence[int]],
    patches: Sequence[Sequence[Patch]] | None = None,
    layers: Sequence[LayerSpec] = (),
    blind: Sequence[tuple[list[int], list[int]] | None] | None = None,
) -> tuple[torch.Tensor, dict[Location, torch.Tensor], Batch]:
    """Full-sequence logits and hidden states of one padded batch, with optional patches and attention
    restrictions (for inspection, tests and evaluations that read the prefill).

    Returns ``(logits [B, N, V], {location: hidden [B, N, d]}, batch)``; columns are padded positions and the
    hidden states are read after the patches at that location.
    """
    runs = [
        PatchedRun(list(seq), list(p), b) for seq, p, b in zip(ids, patches or [[] for _ in ids], blind or [None for _ in ids])
    ]
    batch = left_pad([r.ids for r in runs], lm.pad_id, lm.device)
    read = [resolve_layer(layer, lm.n_layers) for layer in layers]
    out, seen = _prefill(lm, batch, runs, use_cache=False, read=read)
    return out.logits.float(), seen, batch
