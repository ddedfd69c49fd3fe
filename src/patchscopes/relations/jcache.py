"""A directory cache of per-prompt Jacobians, so seeds, sweeps and restarts never recompute one.

Keyed by model weights, prompt ids, subject position, layers and aggregation; each entry is one
``.safetensors`` file written atomically. Processes sharing the directory (seeds run in parallel) take a
lock per entry (released by the operating system if its holder dies), and wait for an entry another process
is computing instead of duplicating it.

    >>> cache = JacobianCache("runs/lrc/jacobians")
    >>> located = prompts[0].locate(lm)
    >>> jac = cache(lm, located, subject_layer=1, object_layers=[3], aggregation="mean")
    >>> again = cache(lm, located, subject_layer=1, object_layers=[3], aggregation="mean")   # read back, not recomputed
    >>> bool(torch.equal(jac.weight, again.weight))
    True
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from filelock import Timeout
from safetensors.torch import load_file, save_file

from patchscopes.files import atomic_path, file_lock
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
            return self._load(found, layers)
        path = self.directory / f"{base}-{'_'.join(map(str, layers))}.safetensors"
        try:
            with file_lock(path.with_suffix(".lock"), timeout=self.wait_s):
                found = self._find(base, layers)  # another process may have computed it while this one waited
                if found is not None:
                    return self._load(found, layers)
                return self._compute(lm, located, subject_layer, layers, aggregation, path)
        except Timeout:
            message = f"{path.name}: another process has held its lock for {self.wait_s:.0f} s; computing it here"
            warnings.warn(message, stacklevel=2)
            return self._compute(lm, located, subject_layer, layers, aggregation, path)

    def _load(self, found: tuple[Path, list[int]], layers: list[int]) -> PromptJacobian:
        self.hits += 1
        path, stored = found
        t = load_file(str(path))
        index = [stored.index(x) for x in layers]
        return PromptJacobian(weight=t["weight"][index], subject=t["subject"], object=t["object"][index])

    def _compute(
        self, lm: ModelHandle, located: Located, subject_layer: int, layers: list[int], aggregation: Aggregation, path: Path
    ) -> PromptJacobian:
        self.misses += 1
        jac = prompt_jacobian(lm, located, subject_layer, layers, aggregation)
        tensors = {"weight": jac.weight.contiguous(), "subject": jac.subject.contiguous(), "object": jac.object.contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return jac
