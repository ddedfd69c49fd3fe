"""A checkpoint of a streaming map fit, so that an interrupted fit continues where it stopped.

A fit folds chunks of texts into one :class:`~patchscopes.mappings.AffineFitter` per layer pair. Its state
after a chunk is the fitters' sufficient statistics, the count of positions and of norm-filtered ones, and
the index of the next chunk. :class:`FitCheckpoint` writes that state atomically (a temporary file, then a
rename), so a run killed while writing keeps the previous checkpoint. It reads the state back only for the
same fit: the ``key`` holds everything that decides the statistics (both models' weights, the corpus, the
pairs, the chunking, the filter), and a file written under another key is refused with the fix.

    >>> import tempfile, torch
    >>> from patchscopes.mappings import AffineFitter
    >>> fitter = AffineFitter(3, 2); fitter.update(torch.ones(4, 3), torch.ones(4, 2))
    >>> point = FitCheckpoint(Path(tempfile.mkdtemp()) / "fit.pt", {"corpus": "abc"})
    >>> point.save(next_chunk=64, n_fit=4, excluded={(0, 1): 0}, fitters={(0, 1): fitter})
    >>> state = point.load()
    >>> state.next_chunk, state.n_fit, state.fitters[(0, 1)].n
    (64, 4, 4)
    >>> point.remove(); point.load() is None
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchscopes.errors import MappingError
from patchscopes.mappings import AffineFitter


@dataclass
class FitState:
    """Where a fit stopped: the next chunk's start (in texts), the positions folded in, the fitters."""

    next_chunk: int
    n_fit: int
    excluded: dict[tuple[int, int], int]
    fitters: dict[tuple[int, int], AffineFitter]


def _pair_key(pair: tuple[int, int]) -> str:
    return f"{pair[0]},{pair[1]}"


def _pair(key: str) -> tuple[int, int]:
    s, t = key.split(",")
    return int(s), int(t)


class FitCheckpoint:
    """The state of one fit in the file ``path``, bound to ``key`` (JSON-able, e.g. the fit's settings)."""

    def __init__(self, path: str | Path, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))

    def save(
        self,
        next_chunk: int,
        n_fit: int,
        excluded: dict[tuple[int, int], int],
        fitters: dict[tuple[int, int], AffineFitter],
    ) -> None:
        """Write the state after the chunks before ``next_chunk``, replacing the previous one atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": json.dumps(self.key, sort_keys=True),
            "next_chunk": next_chunk,
            "n_fit": n_fit,
            "excluded": {_pair_key(p): n for p, n in excluded.items()},
            "fitters": {_pair_key(p): f.state() for p, f in fitters.items()},
        }
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        torch.save(payload, partial)
        os.replace(partial, self.path)

    def load(self) -> FitState | None:
        """The saved state, or None when there is none. Raises ``MappingError`` for a file of another fit."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which and how to go on
            raise MappingError(
                f"the fit checkpoint {self.path} cannot be read (not a complete checkpoint: {type(error).__name__}); "
                "delete it to fit from the start"
            ) from None
        if json.loads(payload["key"]) != self.key:
            raise MappingError(
                f"the fit checkpoint {self.path} belongs to another fit (other models, texts, pairs or settings); "
                "delete it or pass another checkpoint path"
            )
        fitters = {_pair(k): AffineFitter.restore(v) for k, v in payload["fitters"].items()}
        excluded = {_pair(k): int(v) for k, v in payload["excluded"].items()}
        return FitState(int(payload["next_chunk"]), int(payload["n_fit"]), excluded, fitters)

    def remove(self) -> None:
        """Delete the checkpoint (the fit finished)."""
        self.path.unlink(missing_ok=True)
