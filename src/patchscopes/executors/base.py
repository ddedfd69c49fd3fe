"""What every executor shares: the protocol, reading the sources, mapping the states, building results.

An executor runs a :class:`~patchscopes.plan.Plan` and returns one :class:`~patchscopes.patching.RunOutput`
(next-token logits, generated ids) per step, in the plan's order; :func:`result_of` turns each into the
:class:`~patchscopes.scope.PatchscopeResult` every caller sees, whichever executor ran it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from patchscopes.capture import capture
from patchscopes.errors import MappingError
from patchscopes.layers import Location
from patchscopes.mappings import apply_mapping
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import Patch, PatchedRun, RunOutput
from patchscopes.plan import DecodeGroup, Plan, Step
from patchscopes.scope import Generate, PatchscopeResult

Progress = Callable[[int], None] | None


class Executor(ABC):
    """Runs plans. ``why_not`` says why it cannot run one exactly (None when it can); ``run`` runs it."""

    name: str = "executor"

    def why_not(self, model: ModelHandle, plan: Plan) -> str | None:
        """Why this executor cannot run ``plan`` on ``model`` exactly, or None."""
        return None

    def supports(self, model: ModelHandle, plan: Plan) -> bool:
        return self.why_not(model, plan) is None

    @abstractmethod
    def run(
        self, plan: Plan, model: ModelHandle, target_model: ModelHandle, batch_size: int = 16, on_batch: Progress = None
    ) -> list[RunOutput]:
        """One output per step of ``plan``, in its order; ``on_batch(n)`` after each target batch of ``n`` steps."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def map_state(step: Step, hidden: torch.Tensor, tlm: ModelHandle, device: torch.device | str) -> torch.Tensor:
    """Apply the step's mapping where its weights live; the result goes to ``device``, checked against ``tlm``."""
    mapped = apply_mapping(step.mapping, hidden, device)
    if mapped.shape[-1] != tlm.hidden_size:
        raise MappingError(f"the mapping returns size {mapped.shape[-1]} but {tlm.name} has hidden size {tlm.hidden_size}")
    return mapped


def top_of(outputs: Sequence[RunOutput], k: int, chunk: int = 256) -> list[tuple[list[int], list[float]]]:
    """The ``k`` most likely next tokens of each output and their probabilities, ``chunk`` rows at a time."""
    tops: list[tuple[list[int], list[float]]] = []
    for offset in range(0, len(outputs), chunk):
        logits = torch.stack([o.logits.float() for o in outputs[offset : offset + chunk]])
        top = torch.topk(logits, min(k, logits.shape[-1]))  # the softmax keeps the order
        # the softmax itself, row by row as a single result's ``probs`` computes it: the same numbers, bit for bit
        probs = torch.softmax(logits, dim=-1).gather(-1, top.indices)
        tops.extend(zip(top.indices.tolist(), probs.tolist()))
    return tops


def result_of(
    step: Step, output: RunOutput, lm: ModelHandle, tlm: ModelHandle, top: tuple[list[int], list[float]] | None = None
) -> PatchscopeResult:
    """The result of one step from its logits and generated ids (``top``: its :func:`top_of`, when known)."""
    top_k = step.scope.decoding.top_k
    top_ids, top_probs = top or top_of([output], top_k)[0]
    top_ids, top_probs = top_ids[:top_k], top_probs[:top_k]
    top_tokens = tlm.token_strings(top_ids)
    text = tlm.tokenizer.decode(output.generated) if isinstance(step.scope.decoding, Generate) else top_tokens[0]
    return PatchscopeResult(
        scope=step.scope,
        source_positions=step.source_positions,
        target_positions=step.target_positions,
        source_layer=step.source_layer,
        target_layer=step.target_layer,
        source_tokens=lm.token_strings([step.source_ids[p] for p in step.source_positions]),
        logits=output.logits,
        top_ids=top_ids,
        top_tokens=top_tokens,
        top_probs=top_probs,
        generated_ids=output.generated,
        text=text,
        chat_text=step.chat_text,
    )


def read_sources(plan: Plan, lm: ModelHandle, batch_size: int) -> list[dict[Location, torch.Tensor]]:
    """Each source read's states ``{layer: [n_positions, d]}``, one capture call per layer set."""
    states: list[dict[Location, torch.Tensor]] = [{} for _ in plan.reads]
    for layers, members in plan.reads_by_layers().items():
        reads = [plan.reads[i] for i in members]
        captured = capture(lm, [list(r.ids) for r in reads], [list(r.positions) for r in reads], list(layers), batch_size)
        for i, tensor in zip(members, captured):
            states[i] = {layer: tensor[j] for j, layer in enumerate(layers)}
    return states


class NativeExecutor(Executor):
    """Reads sources with native hooks, maps them on the host, and decodes each group with :meth:`decode`."""

    @abstractmethod
    def decode(
        self, tlm: ModelHandle, group: DecodeGroup, runs: Sequence[PatchedRun], batch_size: int, on_batch: Progress
    ) -> list[RunOutput]:
        """Outputs of one decode group's patched runs (in the group's step order)."""

    def run(
        self, plan: Plan, model: ModelHandle, target_model: ModelHandle, batch_size: int = 16, on_batch: Progress = None
    ) -> list[RunOutput]:
        states = read_sources(plan, model, batch_size)
        runs = []
        for step in plan.steps:
            mapped = map_state(step, states[step.read][step.source_layer], target_model, target_model.device)
            runs.append(PatchedRun(step.target_ids, [Patch(step.target_layer, step.target_positions, mapped, step.scope.mode)]))
        outputs: list[RunOutput | None] = [None] * len(plan.steps)
        for group in plan.decodes:
            for i, out in zip(
                group.steps, self.decode(target_model, group, [runs[i] for i in group.steps], batch_size, on_batch)
            ):
                outputs[i] = out
        return [o for o in outputs if o is not None]


__all__ = ["Executor", "NativeExecutor", "Progress", "map_state", "read_sources", "result_of", "top_of"]
