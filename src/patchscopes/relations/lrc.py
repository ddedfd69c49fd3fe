"""Linear Relational Concepts (Chanin et al. 2024): one direction in subject space per object value.

For object value ``v`` the concept is the normalised mean, over training prompts whose answer is ``v``, of
``W†(o − b)`` (an LRE's low-rank inverse applied to the object states). A :class:`ConceptSet` classifies a
subject state by the largest dot product, and saves as ``concepts.safetensors`` + ``concepts.json``.

    >>> from patchscopes.relations.lre import estimate_lre
    >>> lre = estimate_lre(lm, prompts, subject_layer=1, object_layer=3)
    >>> concepts = lrc_concepts(lm, lre, prompts, rank=8)
    >>> concepts.names
    ['Paris', 'Tokyo']
    >>> len(concepts.classify(torch.randn(5, lm.hidden_size)))      # one object name per subject state
    5
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from patchscopes.capture import capture
from patchscopes.errors import PatchscopeError
from patchscopes.hub import HubMixin
from patchscopes.models.loading import ModelHandle
from patchscopes.relations.jacobian import Aggregation
from patchscopes.relations.lre import LinearRelationalEmbedding
from patchscopes.relations.prompts import RelationPrompt


class ConceptError(PatchscopeError, ValueError):
    """Concepts that cannot be built, used or loaded as asked."""


class ConceptSet(HubMixin):
    """Named unit vectors in the subject space of one layer (``vectors[i]`` is the concept of ``names[i]``).

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` share it on the Hub (:mod:`patchscopes.hub`)."""

    hub_kind = "concepts"

    def __init__(self, names: Sequence[str], vectors: torch.Tensor, metadata: dict[str, Any] | None = None) -> None:
        if vectors.dim() != 2 or vectors.shape[0] != len(names):
            raise ConceptError(f"{len(names)} concept names need vectors [{len(names)}, d], got {tuple(vectors.shape)}")
        if len(set(names)) != len(names):
            raise ConceptError(f"concept names must be unique, got {list(names)}")
        self.names = list(names)
        self.vectors = vectors.detach().float().cpu()
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __repr__(self) -> str:
        meta = self.metadata
        return f"ConceptSet({meta.get('method', '?')}, {len(self.names)} concepts, layer {meta.get('subject_layer')})"

    def __len__(self) -> int:
        return len(self.names)

    def vector(self, name: str) -> torch.Tensor:
        try:
            return self.vectors[self.names.index(name)]
        except ValueError:
            raise ConceptError(f"no concept named {name!r}; known: {', '.join(self.names)}") from None

    def scores(self, subjects: torch.Tensor) -> torch.Tensor:
        """Dot products ``[n, n_concepts]`` of subject states ``[n, d]`` with every concept."""
        return subjects.float() @ self.vectors.T

    def classify(self, subjects: torch.Tensor) -> list[str]:
        """The concept with the largest dot product, per subject state."""
        return [self.names[i] for i in self.scores(subjects).argmax(-1).tolist()]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.contiguous()}, str(path / "concepts.safetensors"))
        meta = {"type": "concepts", "names": self.names, **self.metadata}
        (path / "concepts.json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ConceptSet:
        path = Path(directory)
        if not (path / "concepts.json").is_file() or not (path / "concepts.safetensors").is_file():
            raise ConceptError(f"{path} is not a saved concept set (expected concepts.json and concepts.safetensors)")
        meta = json.loads((path / "concepts.json").read_text())
        meta.pop("type", None)
        names = meta.pop("names")
        vectors = load_file(str(path / "concepts.safetensors"))["vectors"].clone()  # aligned, as LinearRelationalEmbedding.load
        return cls(names, vectors, meta)


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def subject_states(lm: ModelHandle, prompts: Sequence[RelationPrompt], layer: int, batch_size: int = 16) -> torch.Tensor:
    """Block ``layer`` output at the last subject token of each prompt: ``[n, d]`` (the answer is not fed)."""
    located = [p.locate(lm) for p in prompts]
    states = capture(lm, [loc.prompt_ids for loc in located], [[loc.subject] for loc in located], [layer], batch_size)
    return torch.stack([s[0, 0] for s in states]).float()


def object_states(
    lm: ModelHandle, prompts: Sequence[RelationPrompt], layer: int, aggregation: Aggregation = "mean", batch_size: int = 16
) -> torch.Tensor:
    """Block ``layer`` output at the answer-predicting positions (mean, or the first), prompt plus answer fed: ``[n, d]``."""
    located = [p.locate(lm) for p in prompts]
    positions = [loc.predicting if aggregation == "mean" else loc.predicting[:1] for loc in located]
    states = capture(lm, [loc.ids[: pos[-1] + 1] for loc, pos in zip(located, positions)], positions, [layer], batch_size)
    return torch.stack([s[0].mean(0) for s in states]).float()


def lrc_from_objects(
    lre: LinearRelationalEmbedding, objects: torch.Tensor, labels: Sequence[str], rank: int | None, **metadata: Any
) -> ConceptSet:
    """Concepts from precomputed object states ``[n, d]`` and their object labels."""
    if len(labels) != objects.shape[0] or not len(labels):
        raise ConceptError(f"need one label per object state; got {len(labels)} labels for {objects.shape[0]} states")
    inverted = lre.invert(objects, rank)
    names = sorted(set(labels))
    vectors = torch.stack([inverted[[i for i, lab in enumerate(labels) if lab == name]].mean(0) for name in names])
    meta = {
        "method": "lrc",
        "rank": rank,
        **{
            k: lre.metadata.get(k)
            for k in ("model", "weights_sha256", "relation", "subject_layer", "object_layer", "aggregation")
        },
        **metadata,
    }
    return ConceptSet(names, normalise(vectors), meta)


def lrc_concepts(
    lm: ModelHandle,
    lre: LinearRelationalEmbedding,
    prompts: Sequence[RelationPrompt],
    rank: int | None = 192,
    batch_size: int = 16,
) -> ConceptSet:
    """One concept per object value among ``prompts`` (training prompts, answered correctly)."""
    lre.check_model(lm)
    rank = None if rank is None else min(rank, lm.hidden_size)
    aggregation = lre.metadata.get("aggregation", "mean")
    objects = object_states(lm, prompts, lre.object_layer, aggregation, batch_size)
    return lrc_from_objects(lre, objects, [p.object for p in prompts], rank, n_train=len(prompts))
