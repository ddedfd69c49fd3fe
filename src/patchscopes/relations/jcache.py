"""A directory cache of per-prompt Jacobians, so seeds, sweeps and restarts never recompute one.

Keyed by model weights, prompt ids, subject position, layers and aggregation; each entry is one
``.safetensors`` file written atomically. Processes sharing the directory (seeds run in parallel) take a
lock file per entry, and wait for an entry another process is computing instead of duplicating it.

    >>> cache = JacobianCache("runs/lrc/jacobians")                                  # doctest: +SKIP
    >>> jac = cache(lm, located, subject_layer=16, object_layers=[20], aggregation="mean")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file

from patchscopes.models.loading import ModelHandle
from patchscopes.relations.jacobian import Aggregation, PromptJacobian, prompt_jacobian
from patchscopes.relations.prompts import Located


class JacobianCache:
    """Callable like :func:`prompt_jacobian`; stores and reuses results under ``directory``."""

    def __init__(self, directory: str | Path, wait_s: float = 3600.0) -> None:
        self.wait_s = wait_s
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _base(self, lm: ModelHandle, located: Located, subject_layer: int, aggregation: str) -> str:
        key = json.dumps([lm.name, lm.weights_sha256, located.ids, located.subject, located.answer, subject_layer, aggregation])
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def _find(self, base: str, layers: list[int]) -> tuple[Path, list[int]] | None:
        """A stored entry whose object layers include all of ``layers`` (a sweep's entry serves single layers)."""
        for path in sorted(self.directory.glob(f"{base}-*.safetensors")):
            stored = [int(x) for x in path.stem.split("-", 1)[1].split("_")]
            if set(layers) <= set(stored):
                return path, stored
        return None

    def __call__(
        self,
        lm: ModelHandle,
        located: Located,
        subject_layer: int,
        object_layers: Sequence[int],
        aggregation: Aggregation = "mean",
    ) -> PromptJacobian:
        layers = sorted(set(int(x) for x in object_layers))
        base = self._base(lm, located, subject_layer, aggregation)
        found = self._find(base, layers)
        if found is not None:
            self.hits += 1
            path, stored = found
            t = load_file(str(path))
            index = [stored.index(x) for x in layers]
            return PromptJacobian(weight=t["weight"][index], subject=t["subject"], object=t["object"][index])
        path = self.directory / f"{base}-{'_'.join(map(str, layers))}.safetensors"
        lock = path.with_suffix(".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:  # another process is computing this entry: wait for it (or for a stale lock to age)
            waited = 0.0
            while lock.exists() and not path.is_file() and waited < self.wait_s:
                time.sleep(5.0)
                waited += 5.0
            if path.is_file():
                return self(lm, located, subject_layer, layers, aggregation)
        self.misses += 1
        try:
            jac = prompt_jacobian(lm, located, subject_layer, layers, aggregation)
        finally:
            lock.unlink(missing_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"weight": jac.weight.contiguous(), "subject": jac.subject.contiguous(), "object": jac.object.contiguous()}
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return jac
