"""Write hidden states into a forward pass (replace or add), on the prefill pass only, then decode.

This is the one generic engine every Patchscope, lens and sweep goes through::

    run = PatchedRun(ids=lm.tokenize("cat -> cat\\n?").ids,
                     patches=[Patch(layer=5, positions=[-1 % n], vectors=h[None])])
    [out] = run_patched(lm, [run], max_new_tokens=0)   # next-token logits in out.logits
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from patchscopes import compat
from patchscopes.batching import Batch, chunks, left_pad
from patchscopes.capture import layer_hooks
from patchscopes.errors import LayerError, MappingError, SpecError
from patchscopes.models.loading import ModelHandle

PatchMode = Literal["replace", "add"]


@dataclass
class Patch:
    """Hidden states to write at one resolved layer and non-negative positions of the unpadded prompt."""

    layer: int
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
    """One target prompt (token ids) and the patches to apply to it."""

    ids: list[int]
    patches: list[Patch] = field(default_factory=list)


@dataclass
class RunOutput:
    """Next-token logits after the prompt (float32, CPU) and, when generating, the new token ids."""

    logits: torch.Tensor
    generated: list[int] = field(default_factory=list)


def _patch_table(lm: ModelHandle, batch: Batch, runs: Sequence[PatchedRun]) -> dict[int, list[tuple]]:
    table: dict[int, list[tuple]] = {}
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
            table.setdefault(patch.layer, []).append((row, cols, patch.vectors, patch.mode))
    return table


def _apply(hidden: torch.Tensor, entries: list[tuple]) -> torch.Tensor:
    hidden = hidden.clone()
    for row, cols, vectors, mode in entries:
        index = torch.tensor(cols, device=hidden.device)
        v = vectors.to(device=hidden.device, dtype=hidden.dtype)
        if mode == "replace":
            hidden[row, index] = v
        else:
            hidden[row, index] = hidden[row, index] + v
    return hidden


@torch.no_grad()
def continue_generation(
    lm: ModelHandle,
    logits: torch.Tensor,
    past: Any,
    mask: torch.Tensor,
    last_positions: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[list[int]]:
    """Decode ``max_new_tokens`` per row from next-token ``logits`` and a KV cache (unpatched steps).

    Greedy unless ``temperature > 0``; a row stops at the model's end-of-sequence token (not included).
    ``generator`` may be one per row, so that each row's sample depends on its own seed only.
    """
    rows = logits.shape[0]
    eos = torch.tensor(sorted(lm.eos_ids) or [-1], device=logits.device)  # the unembedding's device
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    step_logits, positions = logits, last_positions
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(step_logits / temperature, dim=-1).cpu()
            if isinstance(generator, Sequence):
                drawn = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
                nxt = torch.cat(drawn).squeeze(-1).to(step_logits.device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(step_logits.device)
        else:
            nxt = step_logits.argmax(-1)
        finished = torch.isin(nxt, eos)
        for i, token in enumerate(nxt.tolist()):
            if not done[i] and not finished[i]:
                generated[i].append(token)
        done |= finished
        if bool(done.all()):
            break
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


def check_patches_landed(lm: ModelHandle, wanted: set[int], written: set[int]) -> None:
    """A patch whose block never ran would leave the output unpatched: refuse instead of answering."""
    if wanted - written:
        raise LayerError(
            f"block(s) {sorted(wanted - written)} did not run in the forward pass of {lm.name}, so a patch there would "
            "not land (a cross-attention block without cross-attention input skips itself); choose other layers"
        )


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

    Generation is greedy (``temperature=0``) or sampled, continues from the KV cache, and stops a row at
    the model's end-of-sequence token. Mixed-length targets are left-padded with a proper attention
    mask and position ids.
    """
    outputs: list[RunOutput] = []
    keep_last = compat.logits_to_keep_kwargs(lm.model, 1)
    for group in chunks(list(runs), batch_size):
        batch = left_pad([r.ids for r in group], lm.pad_id, lm.device)
        table = _patch_table(lm, batch, group)
        active = {"on": True}
        written: set[int] = set()

        def write(
            layer: int, hidden: torch.Tensor, active: dict = active, table: dict = table, written: set = written
        ) -> torch.Tensor | None:
            if not active["on"]:
                return None
            written.add(layer)
            return _apply(hidden, table[layer])

        with layer_hooks(lm.adapter.blocks, list(table), write):
            out = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=max_new_tokens > 0,
                **keep_last,
            )
            active["on"] = False
            check_patches_landed(lm, set(table), written)
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
                    [torch.Generator().manual_seed(seed) for _ in group] if seed is not None else None,
                )
        for i in range(len(group)):
            outputs.append(RunOutput(logits=logits[i].cpu(), generated=generated[i]))
        if on_batch is not None:
            on_batch(len(group))
    return outputs


@torch.no_grad()
def trace(
    lm: ModelHandle, ids: Sequence[Sequence[int]], patches: Sequence[Sequence[Patch]] | None = None, layers: Sequence[int] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor], Batch]:
    """Full-sequence logits and hidden states of one padded batch, with optional patches (for inspection and tests).

    Returns ``(logits [B, N, V], {layer: hidden [B, N, d]}, batch)``; columns are padded positions.
    """
    runs = [PatchedRun(list(seq), list(p)) for seq, p in zip(ids, patches or [[] for _ in ids])]
    batch = left_pad([r.ids for r in runs], lm.pad_id, lm.device)
    table = _patch_table(lm, batch, runs)
    seen: dict[int, torch.Tensor] = {}

    def hook(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        new = _apply(hidden, table[layer]) if layer in table else None
        if layer in layers:
            seen[layer] = (new if new is not None else hidden).detach().clone()
        return new

    with layer_hooks(lm.adapter.blocks, sorted(set(table) | set(layers)), hook):
        out = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        )
    return out.logits.float(), seen, batch
