"""Patchscopes compiled into a plan: what to read from which source, what to write where, how to decode.

A plan is plain data. Every executor (:mod:`patchscopes.executors`) runs the same plan, so resolution
(positions, layers, the target prompt, mapping checks), deduplication of source reads and grouping by
decoding happen here once:

- each :class:`Step` is one resolved Patchscope, in the caller's order;
- each :class:`SourceRead` is one source prompt at its positions, read once at every layer its steps need;
- each :class:`DecodeGroup` gathers the steps that share a decoding, and inside it the :class:`TargetGroup`
  of steps that patch one target prompt, from one position, at one layer (what the replay engine shares).

>>> from patchscopes.presets import TOKEN_IDENTITY
>>> plan = compile_plan([TOKEN_IDENTITY.scope("cat", layer=l) for l in (0, 1)], lm)
>>> len(plan.steps), len(plan.reads)            # two steps; "cat" is read once, at both layers
(2, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from patchscopes.chat import target_text
from patchscopes.errors import MappingError, SpecError
from patchscopes.layers import EMBEDDINGS, Location, depth, resolve_layer
from patchscopes.mappings import AffineMap, as_mapping
from patchscopes.models.loading import ModelHandle
from patchscopes.positions import resolve_positions
from patchscopes.scope import SAME, Decoding, Generate, Patchscope


@dataclass(frozen=True)
class SourceRead:
    """One source prompt's token ids and positions, read at ``layers`` (in execution order)."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    layers: tuple[Location, ...]


@dataclass
class Step:
    """One Patchscope, resolved: token ids, non-negative positions, resolved locations and the mapping."""

    scope: Patchscope
    source_ids: list[int]
    source_positions: list[int]
    source_layer: Location
    target_ids: list[int]
    target_positions: list[int]
    target_layer: Location
    mapping: Callable[[torch.Tensor], torch.Tensor]
    read: int = -1  # index of its SourceRead in the plan
    chat_text: str | None = None  # the templated target text, when the target was wrapped with a chat template

    @property
    def source_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.source_ids), tuple(self.source_positions)


@dataclass(frozen=True)
class TargetGroup:
    """Steps that patch one target prompt from position ``start`` at ``layer``: they share every block before it."""

    ids: tuple[int, ...]
    start: int
    layer: Location
    steps: tuple[int, ...]


@dataclass
class DecodeGroup:
    """Steps that decode alike (one decoding), and their target groups."""

    decoding: Decoding
    steps: list[int]
    targets: list[TargetGroup] = field(default_factory=list)

    @property
    def max_new_tokens(self) -> int:
        return self.decoding.max_new_tokens if isinstance(self.decoding, Generate) else 0

    @property
    def temperature(self) -> float:
        return self.decoding.temperature if isinstance(self.decoding, Generate) else 0.0

    @property
    def seed(self) -> int | None:
        return self.decoding.seed if isinstance(self.decoding, Generate) else None


@dataclass
class Plan:
    """Resolved steps, the source reads they need and their decode groups."""

    steps: list[Step]
    reads: list[SourceRead]
    decodes: list[DecodeGroup]

    def reads_by_layers(self) -> dict[tuple[Location, ...], list[int]]:
        """Source reads grouped by their layer set: one capture call serves each group."""
        groups: dict[tuple[Location, ...], list[int]] = {}
        for index, read in enumerate(self.reads):
            groups.setdefault(read.layers, []).append(index)
        return groups

    def __str__(self) -> str:
        lines = [f"Plan: {len(self.steps)} step(s), {len(self.reads)} source read(s), {len(self.decodes)} decode group(s)"]
        for index, read in enumerate(self.reads):
            lines.append(f"  read {index}: {len(read.ids)} tokens at {list(read.positions)}, layers {list(read.layers)}")
        for group in self.decodes:
            lines.append(f"  decode {group.decoding}: {len(group.steps)} step(s)")
            for target in group.targets:
                lines.append(
                    f"    target of {len(target.ids)} tokens from position {target.start} at layer {target.layer}: "
                    f"steps {list(target.steps)}"
                )
        return "\n".join(lines)


def resolve_step(scope: Patchscope, lm: ModelHandle, tlm: ModelHandle) -> Step:
    """Resolve one Patchscope against its source and target models (every check before anything runs)."""
    s, t = scope.source, scope.target
    for loc, handle, role in ((s, lm, "source"), (t, tlm, "target")):
        if loc.model is not None and loc.model != handle.name:
            raise SpecError(f"the {role} names model {loc.model!r} but runs on {handle.name!r}; pass the matching model")
    src_tok = lm.tokenize(s.prompt)
    src_positions = resolve_positions(s.position, s.prompt, src_tok.offsets)
    src_layer = resolve_layer(s.layer, lm.n_layers)
    tgt_prompt = s.prompt if t.prompt is None else t.prompt
    if t.prompt is None and tlm is not lm and tlm.tokenizer is not lm.tokenizer:
        raise SpecError("a target without a prompt reuses the source prompt, which needs the same model or tokenizer")
    if t.position == SAME and t.chat is True:
        raise SpecError(
            "target position 'same' reuses the source's token indices, which the chat template shifts; "
            "give the target an explicit position (such as a Placeholder) or pass chat=False"
        )
    tgt_tok = target_text(tlm, tgt_prompt, False if t.position == SAME else t.chat)
    if t.position == SAME:
        tgt_positions = list(src_positions)
    else:
        tgt_positions = tgt_tok.resolve(t.position)  # type: ignore[arg-type]
    if t.layer == SAME:
        if src_layer == EMBEDDINGS:
            raise SpecError(f"target layer 'same' with source layer {EMBEDDINGS!r}: give the target layer explicitly")
        tgt_layer = resolve_layer(s.layer, tlm.n_layers)
    else:
        tgt_layer = resolve_layer(t.layer, tlm.n_layers)
    if len(src_positions) != len(tgt_positions):
        raise SpecError(
            f"{len(src_positions)} source position(s) {src_positions} but {len(tgt_positions)} target position(s) "
            f"{tgt_positions}: multi-token patching pairs them one to one"
        )
    tgt_ids = tgt_tok.ids[: max(tgt_positions) + 1] if t.decode_at == "patch" else tgt_tok.ids
    mapping = as_mapping(scope.mapping)
    if isinstance(mapping, AffineMap):
        mapping.check_provenance(lm, tlm, src_layer, tgt_layer)
    elif scope.mapping is None and lm.hidden_size != tlm.hidden_size:
        raise MappingError(
            f"incompatible hidden sizes: {lm.name} has {lm.hidden_size}, {tlm.name} has {tlm.hidden_size}; "
            "pass mapping= an AffineMap fitted between them (see patchscopes.mappings)"
        )
    chat_text = tgt_tok.text if tgt_tok.chat else None
    return Step(scope, src_tok.ids, src_positions, src_layer, tgt_ids, tgt_positions, tgt_layer, mapping, chat_text=chat_text)


def compile_plan(scopes: Sequence[Patchscope], model: ModelHandle, target_model: ModelHandle | None = None) -> Plan:
    """Resolve ``scopes`` and lay out their source reads and decode groups."""
    tlm = target_model or model
    steps = [resolve_step(scope, model, tlm) for scope in scopes]
    return plan_of(steps)


def plan_of(steps: list[Step]) -> Plan:
    """The plan of already resolved steps (their ``read`` indices are set here)."""
    layers: dict[tuple, set[Location]] = {}
    for step in steps:
        layers.setdefault(step.source_key, set()).add(step.source_layer)
    keys = list(layers)
    reads = [SourceRead(ids, positions, tuple(sorted(layers[(ids, positions)], key=depth))) for ids, positions in keys]
    index = {key: i for i, key in enumerate(keys)}
    for step in steps:
        step.read = index[step.source_key]
    by_decoding: dict[Decoding, list[int]] = {}
    for i, step in enumerate(steps):
        by_decoding.setdefault(step.scope.decoding, []).append(i)
    decodes = []
    for decoding, members in by_decoding.items():
        targets: dict[tuple, list[int]] = {}
        for i in members:
            step = steps[i]
            targets.setdefault((tuple(step.target_ids), min(step.target_positions), step.target_layer), []).append(i)
        groups = [TargetGroup(ids, start, layer, tuple(m)) for (ids, start, layer), m in targets.items()]
        decodes.append(DecodeGroup(decoding, members, groups))
    return Plan(steps, reads, decodes)


__all__ = ["DecodeGroup", "Plan", "SourceRead", "Step", "TargetGroup", "compile_plan", "plan_of", "resolve_step"]
