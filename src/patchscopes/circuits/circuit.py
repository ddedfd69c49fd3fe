"""A circuit: a boolean keep-mask over named parameters of a model, saved as safetensors + JSON.

>>> import torch
>>> c = Circuit({"w": torch.tensor([True, False, True, False])}, {"task": "demo"})
>>> c.n_kept, c.n_total, c.density
(2, 4, 0.5)
>>> c.digest == Circuit({"w": torch.tensor([True, False, True, False])}).digest != c.complement().digest
True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchscopes.errors import PatchscopeError


class CircuitError(PatchscopeError, ValueError):
    """A circuit or mask file that does not fit the model or the other circuit it is used with."""


def _packed(mask: torch.Tensor) -> np.ndarray:
    """A boolean mask as bytes, eight weights a byte: the form saved to disk and hashed by the digest."""
    return np.packbits(mask.flatten().numpy())


class Circuit:
    """Kept weights per parameter name (``True`` = in the circuit) with free-form metadata."""

    def __init__(self, masks: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
        self.masks = {name: m.to(torch.bool) for name, m in masks.items()}
        self.metadata = dict(metadata or {})

    @property
    def names(self) -> list[str]:
        return list(self.masks)

    @property
    def n_kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def n_total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def density(self) -> float:
        return self.n_kept / max(self.n_total, 1)

    @property
    def digest(self) -> str:
        """SHA-256 of the kept bits, parameter by parameter (names, shapes and bits; not the metadata): two
        circuits with the same digest keep the same weights."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            m = self.masks[name]
            h.update(f"{name}:{list(m.shape)};".encode())
            h.update(_packed(m).tobytes())
        return h.hexdigest()

    def complement(self) -> Circuit:
        """The masked parameters *not* in the circuit (same scope)."""
        return Circuit({n: ~m for n, m in self.masks.items()}, {**self.metadata, "complement_of": self.metadata.get("label", "")})

    def random_like(self, seed: int = 0) -> Circuit:
        """A uniformly random set of the same size over the same parameters."""
        g = torch.Generator().manual_seed(seed)
        flat = torch.zeros(self.n_total, dtype=torch.bool)
        flat[torch.randperm(self.n_total, generator=g)[: self.n_kept]] = True
        out, start = {}, 0
        for name, m in self.masks.items():
            out[name] = flat[start : start + m.numel()].view(m.shape)
            start += m.numel()
        return Circuit(out, {**self.metadata, "random_like": self.metadata.get("label", ""), "seed": seed})

    def overrides(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Parameter replacements that zero every masked-out weight (for ``functional_call``)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.masks if n not in params]
        if missing:
            raise CircuitError(f"circuit parameters {missing[:3]} are not in this model; was it found on another model?")
        return {n: params[n].detach() * m.to(params[n].dtype) for n, m in self.masks.items()}

    def check_model(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            if n not in params or tuple(params[n].shape) != tuple(m.shape):
                raise CircuitError(
                    f"circuit parameter {n!r} {tuple(m.shape)} does not match the model; load it on the model it was found on"
                )

    def save(self, directory: str | Path) -> Path:
        """Write ``circuit.safetensors`` (bit-packed masks) and ``circuit.json`` (shapes, density, metadata)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        packed = {n: torch.from_numpy(_packed(m)) for n, m in self.masks.items()}
        save_file(packed, str(path / "circuit.safetensors"))
        info = {
            "shapes": {n: list(m.shape) for n, m in self.masks.items()},
            "n_kept": self.n_kept,
            "n_total": self.n_total,
            "density": self.density,
            "metadata": self.metadata,
        }
        (path / "circuit.json").write_text(json.dumps(info, indent=2, default=str))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Circuit:
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / "circuit.json").is_file():
            raise CircuitError(
                f"no circuit.json in {path}; give a directory written by Circuit.save or `patchscopes circuits discover`"
            )
        info = json.loads((path / "circuit.json").read_text())
        packed = load_file(str(path / "circuit.safetensors"))
        masks = {}
        for name, shape in info["shapes"].items():
            n = int(np.prod(shape)) if shape else 1
            bits = np.unpackbits(packed[name].numpy())[:n].astype(bool)
            masks[name] = torch.from_numpy(bits).view(*shape)
        circuit = cls(masks, info.get("metadata", {}))
        if circuit.n_kept != info["n_kept"]:
            raise CircuitError(f"{path} is corrupt: {circuit.n_kept} kept weights, the JSON says {info['n_kept']}")
        return circuit

    def __repr__(self) -> str:
        label = self.metadata.get("label", "")
        return f"Circuit({label!r}, {len(self.masks)} tensors, kept {self.n_kept:,}/{self.n_total:,} = {self.density:.2%})"
