"""The reference executor: every patched run goes through the padded-batch engine of :mod:`patchscopes.patching`."""

from __future__ import annotations

from collections.abc import Sequence

from patchscopes.executors.base import NativeExecutor, Progress
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import PatchedRun, RunOutput, run_patched
from patchscopes.plan import DecodeGroup


class PlainExecutor(NativeExecutor):
    """Runs every plan, on every model the library loads: one full patched forward per target, then the decode loop."""

    name = "plain"

    def decode(
        self, tlm: ModelHandle, group: DecodeGroup, runs: Sequence[PatchedRun], batch_size: int, on_batch: Progress
    ) -> list[RunOutput]:
        return run_patched(tlm, runs, group.max_new_tokens, batch_size, group.temperature, group.seed, on_batch)


__all__ = ["PlainExecutor"]
