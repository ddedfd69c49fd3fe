"""What every evaluation shares: the run configuration written beside the results, seeded sampling, chunks.

>>> config = run_config("next-token", None, seed=0, params={"n_eval": 8})
>>> config["eval"], config["seed"]
('next-token', 0)
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from patchscopes.errors import PatchscopeError
from patchscopes.models.loading import ModelHandle
from patchscopes.results import ResultStore, model_entry, package_versions

T = TypeVar("T")

EVAL_PACKAGES = (
    "patchscopes",
    "torch",
    "transformers",
    "pandas",
    "numpy",
    "scikit-learn",
    "scipy",
    "rouge-score",
    "sentence-transformers",
)


class EvalError(PatchscopeError, ValueError):
    """An evaluation was asked for something it cannot do (an unknown task, too little data, a bad option)."""


class StopAfter(PatchscopeError, RuntimeError):
    """Raised on purpose after ``stop_after`` units of work (used to test that an interrupted run resumes exactly)."""


@functools.cache
def _rouge_l_scorer() -> Any:
    return require("rouge_score.rouge_scorer").RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """RougeL F-measure with Porter stemming: the one scoring rule of both entity-description evaluations.

    >>> round(rouge_l("British royals", "a British royal"), 3)
    0.8
    """
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


def require(module: str) -> Any:
    """Import an optional dependency of the evaluations, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EvalError(f"the evaluations need {module!r}: pip install 'patchscopes[eval]' ({exc})") from exc


def run_config(eval_name: str, lm: ModelHandle | None, seed: int, params: Any) -> dict[str, Any]:
    """The configuration of one run: evaluation, model name, weight hash and dtype, seed and every parameter."""
    values = dataclasses.asdict(params) if dataclasses.is_dataclass(params) and not isinstance(params, type) else dict(params)
    return {
        "eval": eval_name,
        "model": None if lm is None else lm.name,
        **({"weights_sha256": None} if lm is None else model_entry(lm)),
        "seed": seed,
        "params": values,
    }


def open_store(out: str | Path, config: dict[str, Any], schemas: Mapping[str, Iterable[str]] | None = None) -> ResultStore:
    """A resumable store under ``out`` whose ``config.json`` also records package versions.

    ``schemas``: per table, the columns the evaluation's summary reads; a saved unit without them is redone."""
    return ResultStore(out, config, environment=package_versions(EVAL_PACKAGES), schemas=schemas)


def seeded_sample(items: Sequence[T], k: int | None, seed: int) -> list[T]:
    """``k`` items drawn without replacement by a seeded shuffle (all of them, shuffled, when ``k`` is None)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order if k is None else order[:k]


def chunks(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    """``(index of the chunk, items)`` in consecutive chunks of ``size``."""
    for index, start in enumerate(range(0, len(items), max(size, 1))):
        yield index, items[start : start + size]


class UnitCounter:
    """Counts units computed in this process and raises :class:`StopAfter` once ``stop_after`` were written."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.stop_after is not None and self.count >= self.stop_after:
            raise StopAfter(f"stopped on purpose after {self.count} unit(s); run again with the same --out to continue")
