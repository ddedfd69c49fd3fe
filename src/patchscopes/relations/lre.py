"""Linear Relational Embeddings (Hernandez et al. 2023): ``o ≈ W s + b`` for one relation.

``W`` is the mean over training prompts of ∂o/∂s and ``b`` the mean of ``o − W_i s`` (see
:mod:`patchscopes.relations.jacobian`). An LRE is an :class:`~patchscopes.mappings.AffineMap` away from
being a mapping in any Patchscope (:meth:`LinearRelationalEmbedding.as_mapping`), and it saves as
``weights.safetensors`` + ``lre.json``.

    >>> lre = estimate_lre(lm, prompts, subject_layer=1, object_layer=3)
    >>> lre.pinv(rank=8).shape == (lm.hidden_size, lm.hidden_size)
    True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from patchscopes.errors import MappingError, PatchscopeError
from patchscopes.hub import HubMixin
from patchscopes.layers import resolve_block
from patchscopes.mappings import AffineMap
from patchscopes.models.loading import ModelHandle
from patchscopes.relations.jacobian import Aggregation, PromptJacobian, prompt_jacobian
from patchscopes.relations.prompts import RelationPrompt


class LreError(PatchscopeError, ValueError):
    """An LRE that cannot be estimated, inverted or loaded as asked."""


def low_rank_pinv(weight: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of ``weight`` keeping its ``rank`` largest singular values (all if None).

    >>> w = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> low_rank_pinv(w).tolist()
    [[0.5, 0.0], [0.0, 0.25]]
    """
    u, sing, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    r = len(sing) if rank is None else int(rank)
    if not 1 <= r <= len(sing):
        raise LreError(f"inverse rank {rank} is outside 1..{len(sing)} (the size of W)")
    inv = vh[:r].T @ torch.diag(1.0 / sing[:r]) @ u[:, :r].T
    return inv.to(weight.dtype)


class LinearRelationalEmbedding(HubMixin):
    """``o ≈ W s + b`` from the subject state at ``subject_layer`` to the object state at ``object_layer``.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` share it on the Hub (:mod:`patchscopes.hub`)."""

    hub_kind = "lre"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, metadata: dict[str, Any] | None = None) -> None:
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise LreError(f"an LRE needs W [d, d] and b [d]; got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight = weight.detach().float().cpu()
        self.bias = bias.detach().float().cpu()
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"LinearRelationalEmbedding({m.get('relation')!r}, model={m.get('model')!r}, "
            f"layers {m.get('subject_layer')}→{m.get('object_layer')}, {m.get('aggregation')}, n={m.get('n_prompts')})"
        )

    @property
    def subject_layer(self) -> int:
        return int(self.metadata["subject_layer"])

    @property
    def object_layer(self) -> int:
        return int(self.metadata["object_layer"])

    def __call__(self, subject: torch.Tensor) -> torch.Tensor:
        """``W s + b`` for one state ``[d]`` or a batch ``[n, d]``."""
        return subject.float() @ self.weight.T + self.bias

    def pinv(self, rank: int | None = None) -> torch.Tensor:
        """``W†`` at ``rank`` (the LRC paper uses a low rank, e.g. 192 of 4096)."""
        return low_rank_pinv(self.weight, rank)

    def invert(self, objects: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """Subject-space estimates ``W†(o − b)`` for object states ``[n, d]``."""
        return (objects.float() - self.bias) @ self.pinv(rank).T

    def as_mapping(self) -> AffineMap:
        """This LRE as an :class:`AffineMap`, usable as the ``mapping`` of any Patchscope."""
        return AffineMap(self.weight, self.bias, {**self.metadata, "kind": "lre"})

    def attribute_lens(self, lm: ModelHandle, subject: torch.Tensor) -> torch.Tensor:
        """The attribute lens: next-token logits of ``W s + b`` read out by the final norm and unembedding."""
        self.check_model(lm)
        with torch.no_grad():
            hidden = self(subject).to(device=lm.device, dtype=lm.dtype)
            return lm.adapter.decode(hidden).float().cpu()

    def check_model(self, lm: ModelHandle) -> None:
        expected = self.metadata.get("model")
        if expected is not None and expected != lm.name:
            raise MappingError(f"this LRE was estimated on {expected!r}, not {lm.name!r}; estimate one for {lm.name!r}")

    def save(self, directory: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``lre.json`` (model, relation, layers, aggregation, …)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path / "weights.safetensors"))
        (path / "lre.json").write_text(json.dumps({"type": "lre", **self.metadata}, indent=2, default=str))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LinearRelationalEmbedding:
        path = Path(directory)
        if not (path / "lre.json").is_file() or not (path / "weights.safetensors").is_file():
            raise LreError(f"{path} is not a saved LRE (expected lre.json and weights.safetensors); save one with lre.save(dir)")
        meta = json.loads((path / "lre.json").read_text())
        meta.pop("type", None)
        # copies: safetensors' tensors can sit at unaligned offsets, where BLAS sums in another order (last-bit changes)
        tensors = {k: v.clone() for k, v in load_file(str(path / "weights.safetensors")).items()}
        return cls(tensors["weight"], tensors["bias"], meta)


def from_jacobians(jacobians: Sequence[PromptJacobian], index: int = 0, **metadata: Any) -> LinearRelationalEmbedding:
    """Average per-prompt Jacobians (object layer ``index`` of each) into one LRE."""
    if not jacobians:
        raise LreError("no prompts to estimate the LRE from; give at least one correctly answered prompt")
    weight = torch.stack([j.weight[index] for j in jacobians]).mean(0)
    bias = torch.stack([j.bias[index] for j in jacobians]).mean(0)
    return LinearRelationalEmbedding(weight, bias, {"n_prompts": len(jacobians), **metadata})


def estimate_lre(
    lm: ModelHandle,
    prompts: Sequence[RelationPrompt],
    subject_layer: int,
    object_layer: int,
    aggregation: Aggregation = "mean",
    jacobian_fn: Callable[..., PromptJacobian] | None = None,
) -> LinearRelationalEmbedding:
    """Estimate an LRE from training prompts (ideally ones the model answers correctly).

    ``jacobian_fn`` (same signature as :func:`prompt_jacobian`) lets a caller cache per-prompt Jacobians.
    """
    s_layer = resolve_block(subject_layer, lm.n_layers, "an LRE")
    o_layer = resolve_block(object_layer, lm.n_layers, "an LRE")
    fn = jacobian_fn or prompt_jacobian
    jacobians = [fn(lm, p.locate(lm), s_layer, [o_layer], aggregation) for p in prompts]
    relations = sorted({p.relation for p in prompts})
    return from_jacobians(
        jacobians,
        model=lm.name,
        weights_sha256=lm.weights_sha256,
        relation=relations[0] if len(relations) == 1 else relations,
        subject_layer=s_layer,
        object_layer=o_layer,
        aggregation=aggregation,
    )
