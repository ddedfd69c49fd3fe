"""What the library can do with one loaded model, in one record.

>>> from patchscopes.capabilities import Capabilities
>>> Capabilities("tiny", "model.layers", "model.norm", True, None).fast_engine
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patchscopes.models.loading import ModelHandle


@dataclass(frozen=True)
class Capabilities:
    """The layout in use and what runs on it.

    ``fast_engine`` is the verdict of the fast engine's self-check (True, or False with the reason in
    ``fast_engine_problem``); ``edge_attribution`` is whether circuits' EAP can run on its blocks; the
    nnsight backend addresses the same ``blocks`` path.
    """

    model: str
    blocks: str
    final_norm: str | None
    edge_attribution: bool
    fast_engine_problem: str | None

    @property
    def fast_engine(self) -> bool:
        return self.fast_engine_problem is None


def capabilities(lm: ModelHandle) -> Capabilities:
    """Run (or reuse) the fast engine's self-check and report what the library can do with ``lm``."""
    from patchscopes.engine import fast_engine_problem

    spec = lm.adapter.spec
    return Capabilities(
        model=lm.name,
        blocks=spec.blocks,
        final_norm=spec.final_norm,
        edge_attribution=lm.adapter.block_layout is not None,
        fast_engine_problem=fast_engine_problem(lm),
    )
