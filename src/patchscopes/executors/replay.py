"""The replay executor: the fast engine (:mod:`patchscopes.engine`) where it is exact, the reference elsewhere.

``ReplayExecutor()`` (the default, ``"auto"``) runs through the fast engine the steps it covers — a model that
passed the engine's self-check, greedy decoding, one block-layer patch — and through the plain engine the
rest, with one warning line when a model fails the check or the engine fails mid-run.
``ReplayExecutor(strict=True)`` (``"fast"``) raises :class:`~patchscopes.errors.EngineError` instead of
falling back.
"""

from __future__ import annotations

from collections.abc import Sequence

from patchscopes.engine import fast_eligible, fast_engine_problem, run_patched_fast
from patchscopes.errors import EngineError, PatchscopeError, warn_once
from patchscopes.executors.base import NativeExecutor, Progress
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import PatchedRun, RunOutput, run_patched
from patchscopes.plan import DecodeGroup, Plan


class ReplayExecutor(NativeExecutor):
    """Shared target prefixes and replayed blocks; falls back to the plain engine unless ``strict``."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.name = "fast" if strict else "auto"

    def __repr__(self) -> str:
        return f"ReplayExecutor(strict={self.strict})"

    def why_not(self, model: ModelHandle, plan: Plan) -> str | None:
        """Why the fast engine cannot run every step of ``plan`` exactly (the reason ``strict`` raises)."""
        if any(group.temperature > 0 for group in plan.decodes):
            return "the fast engine runs greedy decoding only; use engine='auto' or 'plain' to sample"
        if any(step.target_layer == "embeddings" for step in plan.steps):
            return "the fast engine patches block layers; embeddings patches need engine='auto' or 'plain'"
        problem = fast_engine_problem(model)
        if problem is not None:
            return f"the fast engine cannot run {model.name} exactly: its {problem}; use engine='auto' or 'plain'"
        return None

    def _members(self, tlm: ModelHandle, runs: Sequence[PatchedRun], temperature: float) -> list[int]:
        """Which runs go through the fast engine; ``strict`` raises where it cannot run them exactly."""
        if not runs:
            return []
        if temperature > 0:
            if self.strict:
                raise EngineError("the fast engine runs greedy decoding only; use engine='auto' or 'plain' to sample")
            return []
        eligible = [j for j, run in enumerate(runs) if fast_eligible(tlm, run)]
        if self.strict and len(eligible) < len(runs):
            raise EngineError(
                "the fast engine patches one block layer per run; embeddings patches and several patches per run "
                "need engine='auto' or 'plain'"
            )
        if not eligible:
            return []
        problem = fast_engine_problem(tlm)
        if problem is not None:
            if self.strict:
                raise EngineError(f"the fast engine cannot run {tlm.name} exactly: its {problem}; use engine='auto' or 'plain'")
            warn_once(f"fast-check:{id(tlm.model)}", f"{tlm.name}: using the plain engine, since the fast engine's {problem}")
            return []
        return eligible

    def decode(
        self, tlm: ModelHandle, group: DecodeGroup, runs: Sequence[PatchedRun], batch_size: int, on_batch: Progress
    ) -> list[RunOutput]:
        fast = self._members(tlm, runs, group.temperature)
        outputs: list[RunOutput | None] = [None] * len(runs)
        if fast:
            try:
                outs = run_patched_fast(tlm, [runs[j] for j in fast], group.max_new_tokens, batch_size, on_batch=on_batch)
            except PatchscopeError:  # the caller's own error (a cancellation, a bad input) stops the run as it is
                raise
            except Exception as exc:
                if self.strict:
                    raise EngineError(f"the fast engine failed on {tlm.name}: {type(exc).__name__}: {exc}") from exc
                warn_once(
                    f"fast-failed:{id(tlm.model)}",
                    f"fast engine failed on {tlm.name} ({type(exc).__name__}: {exc}); using the plain engine",
                )
                fast = []
            else:
                for j, out in zip(fast, outs):
                    outputs[j] = out
        plain = [j for j in range(len(runs)) if outputs[j] is None]
        if plain:
            outs = run_patched(
                tlm, [runs[j] for j in plain], group.max_new_tokens, batch_size, group.temperature, group.seed, on_batch
            )
            for j, out in zip(plain, outs):
                outputs[j] = out
        return [o for o in outputs if o is not None]


__all__ = ["ReplayExecutor"]
