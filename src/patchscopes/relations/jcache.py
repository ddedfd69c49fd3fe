"""A directory cache of per-prompt Jacobians, so seeds, sweeps and restarts never recompute one.

Keyed by model weights, prompt ids, subject position, layers and aggregation; each entry is one
``.safetensors`` file written atomically.

    >>> cache = JacobianCache("runs/lrc/jacobians")                                  # doctest: +SKIP
    >>> jac = cache(lm, located, subject_layer=16, object_layers=[20], aggregation="mean")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file

from patchscopes.models.loading import ModelHandle
from patchscopes.relations.jacobian import Aggregation, PromptJacobian, prompt_jacobian
from patchscopes.relations.prompts import Located


class JacobianCache:
    """Callable like :func:`prompt_jacobian`; stores and reuses results under ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(
        self, lm: ModelHandle, located: Located, subject_layer: int, object_layers: Sequence[int], aggregation: str
    ) -> Path:
        key = json.dumps(
            [
                lm.name,
                lm.weights_sha256,
                located.ids,
                located.subject,
                located.answer,
                subject_layer,
                sorted(object_layers),
                aggregation,
            ]
        )
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def __call__(
        self,
        lm: ModelHandle,
        located: Located,
        subject_layer: int,
        object_layers: Sequence[int],
        aggregation: Aggregation = "mean",
    ) -> PromptJacobian:
        path = self._path(lm, located, subject_layer, object_layers, aggregation)
        if path.is_file():
            self.hits += 1
            t = load_file(str(path))
            return PromptJacobian(weight=t["weight"], subject=t["subject"], object=t["object"])
        self.misses += 1
        jac = prompt_jacobian(lm, located, subject_layer, object_layers, aggregation)
        tmp = path.with_suffix(".tmp")
        save_file(
            {"weight": jac.weight.contiguous(), "subject": jac.subject.contiguous(), "object": jac.object.contiguous()}, str(tmp)
        )
        os.replace(tmp, path)
        return jac
