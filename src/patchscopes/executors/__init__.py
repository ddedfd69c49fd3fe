"""Executors: the objects that run a :class:`~patchscopes.plan.Plan`.

- :class:`PlainExecutor` (``"plain"``): the reference, every model, every option;
- :class:`ReplayExecutor` (``"auto"``, the default; ``"fast"`` is ``ReplayExecutor(strict=True)``): the fast
  engine where it is exact, the reference elsewhere;
- :class:`patchscopes.backends.nnsight_backend.NNsightExecutor`: nnsight traces, in this process or on NDIF.

A caller passes an executor object (or one of the three names) as ``executor=`` to
:func:`patchscopes.runner.run_many` and :func:`patchscopes.sweep.sweep`. To add one, subclass
:class:`Executor` (or :class:`NativeExecutor` to reuse the native source reads) and implement ``run``.

>>> as_executor("fast")
ReplayExecutor(strict=True)
"""

from __future__ import annotations

from typing import Literal, Union

from patchscopes.errors import SpecError
from patchscopes.executors.base import Executor, NativeExecutor, map_state, read_sources, result_of, top_of
from patchscopes.executors.plain import PlainExecutor
from patchscopes.executors.replay import ReplayExecutor

Engine = Literal["auto", "fast", "plain"]
ExecutorLike = Union[Executor, Engine]


def as_executor(executor: ExecutorLike) -> Executor:
    """An executor object for ``executor`` (an object is returned as it is)."""
    if isinstance(executor, Executor):
        return executor
    if executor == "auto":
        return ReplayExecutor()
    if executor == "fast":
        return ReplayExecutor(strict=True)
    if executor == "plain":
        return PlainExecutor()
    raise SpecError(
        f"executor {executor!r} is not 'auto', 'fast', 'plain' or an Executor object "
        "(for nnsight: executor=NNsightExecutor() from patchscopes.backends.nnsight_backend)"
    )


__all__ = [
    "Engine",
    "Executor",
    "ExecutorLike",
    "NativeExecutor",
    "PlainExecutor",
    "ReplayExecutor",
    "as_executor",
    "map_state",
    "read_sources",
    "result_of",
    "top_of",
]
