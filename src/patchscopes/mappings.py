"""Mappings applied to a captured hidden state before it is patched: identity, any callable or
``torch.nn.Module``, and :class:`AffineMap`, fitted by least squares and saved with its provenance.

    >>> import torch
    >>> x = torch.randn(200, 8); w = torch.randn(4, 8); b = torch.randn(4)
    >>> m = AffineMap.fit(x, x @ w.T + b)
    >>> bool(torch.allclose(m.weight, w, atol=1e-4))
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from patchscopes.errors import MappingError, MapProvenanceError
from patchscopes.hub import HubMixin

MappingLike = Callable[[torch.Tensor], torch.Tensor]


class _Model(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def weights_sha256(self) -> str | None: ...
    @property
    def hidden_size(self) -> int: ...


class Identity(nn.Module):
    """The identity map (the default)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def __repr__(self) -> str:
        return "Identity()"


class AffineFitter:
    """Streaming least squares for ``y ≈ W x + b``: accumulate batches, then :meth:`solve`.

    Memory is O(d_in²) whatever the number of samples (sufficient statistics in float64).
    """

    def __init__(self, d_in: int, d_out: int, ridge: float = 0.0) -> None:
        self.d_in, self.d_out, self.ridge = d_in, d_out, ridge
        self.xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.y_sum = torch.zeros(d_out, dtype=torch.float64)
        self.yy = 0.0  # Σ‖y‖²: with y_sum, the in-sample R² of the solution comes from the same statistics
        self.n = 0
        self._digest = ""  # chained: sha256(previous digest + the batch's first bytes), so a state can be saved

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in or y.shape[-1] != self.d_out or x.shape[0] != y.shape[0]:
            raise MappingError(
                f"fit data of shapes {tuple(x.shape)} and {tuple(y.shape)} do not match d_in={self.d_in}, d_out={self.d_out}"
            )
        xa = torch.cat([x.detach().double().cpu(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xa.T @ xa
        yd = y.detach().double().cpu()
        self.xty += xa.T @ yd
        self.y_sum += yd.sum(0)
        self.yy += float((yd * yd).sum())
        self.n += int(x.shape[0])
        head = x.detach().float().cpu().numpy().tobytes()[:4096]
        self._digest = hashlib.sha256(self._digest.encode("ascii") + head).hexdigest()

    @property
    def data_hash(self) -> str:
        return self._digest[:16]

    def state(self) -> dict[str, Any]:
        """The sufficient statistics so far, to save and :meth:`restore` (e.g. a checkpoint of a long fit)."""
        return {"xtx": self.xtx, "xty": self.xty, "y_sum": self.y_sum, "yy": self.yy, "n": self.n, "digest": self._digest}

    @classmethod
    def restore(cls, state: dict[str, Any], ridge: float = 0.0) -> AffineFitter:
        """A fitter that continues from a :meth:`state`.

        >>> a = AffineFitter(3, 2); a.update(torch.ones(4, 3), torch.ones(4, 2))
        >>> b = AffineFitter.restore(a.state())
        >>> b.n, b.data_hash == a.data_hash, bool(torch.equal(b.xtx, a.xtx))
        (4, True, True)
        """
        xtx, xty = state["xtx"], state["xty"]
        fitter = cls(xtx.shape[0] - 1, xty.shape[1], ridge)
        fitter.xtx, fitter.xty, fitter.y_sum = xtx.clone(), xty.clone(), state["y_sum"].clone()
        fitter.yy, fitter.n, fitter._digest = float(state["yy"]), int(state["n"]), str(state["digest"])
        return fitter

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise MappingError("no data to fit: call update() with at least one batch")
        reg = torch.eye(self.d_in + 1, dtype=torch.float64) * self.ridge
        reg[-1, -1] = 0.0  # never shrink the bias
        solution = torch.linalg.lstsq(self.xtx + reg, self.xty).solution  # [d_in+1, d_out]
        return solution[:-1].T.contiguous(), solution[-1].contiguous()


def fit_r2(fitter: AffineFitter, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """In-sample R² (pooled over output dimensions) of ``y ≈ W x + b`` on the data ``fitter`` accumulated,
    from its sufficient statistics: SSE = Σ‖y‖² − 2⟨θ, XᵀY⟩ + ⟨θ, XᵀX θ⟩ with θ = [Wᵀ; bᵀ]."""
    theta = torch.cat([weight.double().T, bias.double()[None]], 0)
    sse = fitter.yy - 2 * float((theta * fitter.xty).sum()) + float((theta * (fitter.xtx @ theta)).sum())
    sst = fitter.yy - float((fitter.y_sum**2).sum()) / fitter.n
    return 1 - sse / sst if sst > 0 else float("nan")


def r2_score(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination pooled over all output dimensions."""
    residual = ((target.double() - predicted.double()) ** 2).sum()
    total = ((target.double() - target.double().mean(0)) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


class AffineMap(nn.Module, HubMixin):
    """``h ↦ W h + b`` with metadata (models, layers, fit data hash, fit quality) that travels with it.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` share it on the Hub (:mod:`patchscopes.hub`)."""

    hub_kind = "affine-map"

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise MappingError(
                f"affine map needs weight [d_out, d_in] and bias [d_out], got {tuple(weight.shape)}, {tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.d_in:
            raise MappingError(f"affine map expects inputs of size {self.d_in}, got {hidden.shape[-1]}")
        w = self.weight.to(device=hidden.device, dtype=hidden.dtype)
        b = self.bias.to(device=hidden.device, dtype=hidden.dtype)
        return hidden @ w.T + b

    def __repr__(self) -> str:
        keys = ", ".join(
            f"{k}={v!r}"
            for k, v in self.metadata.items()
            if k in ("source_model", "source_layer", "target_model", "target_layer", "r2")
        )
        return f"AffineMap({self.d_in}→{self.d_out}{', ' + keys if keys else ''})"

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0, **metadata: Any) -> AffineMap:
        """Least-squares fit on paired rows of ``x`` [n, d_in] and ``y`` [n, d_out]."""
        fitter = AffineFitter(x.shape[-1], y.shape[-1], ridge=ridge)
        fitter.update(x, y)
        return cls.from_fitter(fitter, **metadata)

    @classmethod
    def from_fitter(cls, fitter: AffineFitter, **metadata: Any) -> AffineMap:
        weight, bias = fitter.solve()
        meta = {"n_fit": fitter.n, "fit_data_hash": fitter.data_hash, "ridge": fitter.ridge, **metadata}
        meta.setdefault("fit_r2", round(fit_r2(fitter, weight, bias), 6))
        return cls(weight.float(), bias.float(), meta)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """R² of the map on held-out pairs."""
        with torch.no_grad():
            return r2_score(self(x.float()), y.float())

    def save(self, path: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``map.json`` into directory ``path``."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.contiguous().cpu(), "bias": self.bias.contiguous().cpu()},
            str(directory / "weights.safetensors"),
        )
        kept = {k: v for k, v in self.metadata.items() if k != "path"}  # where it was loaded from is no provenance
        meta = {"type": "affine", "d_in": self.d_in, "d_out": self.d_out, **kept}
        (directory / "map.json").write_text(json.dumps(meta, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, path: str | Path, *, redo: str | None = None) -> AffineMap:
        """The map saved in directory ``path``; a missing or damaged file raises :class:`MappingError` naming it
        and saying what to do (``redo``, default: delete the directory and fit the map again)."""
        directory = Path(path)
        redo = redo or f"delete {directory} and fit the map again"
        meta_path, weights_path = directory / "map.json", directory / "weights.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            raise MappingError(f"{directory} is not a saved affine map (expected map.json and weights.safetensors)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("it is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise MappingError(f"{meta_path} is damaged ({exc}); {redo}") from None
        try:
            tensors = load_file(str(weights_path))
            weight, bias = tensors["weight"], tensors["bias"]
        except Exception as exc:  # safetensors raises its own error type on a truncated or foreign file
            detail = f"no tensor {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise MappingError(f"{weights_path} is damaged or truncated ({detail}); {redo}") from None
        meta.pop("type", None)
        meta.pop("d_in", None)
        meta.pop("d_out", None)
        try:
            loaded = cls(weight, bias, meta)
        except MappingError as exc:
            raise MappingError(f"{weights_path} does not hold an affine map ({exc}); {redo}") from None
        loaded.metadata["path"] = str(directory)
        return loaded

    def check_provenance(
        self, source: _Model, target: _Model, source_layer: int | str | None = None, target_layer: int | str | None = None
    ) -> None:
        """Raise :class:`MapProvenanceError` unless the map was fitted from ``source`` to ``target`` (model names,
        weight sha256 and hidden sizes; and the layers, resolved, when given: ``-1`` is the embeddings).
        Metadata the map does not carry is not checked (a hand-made ``AffineMap(w, b)`` checks sizes only)."""
        meta = self.metadata
        where = meta.get("path", "this map")
        for role, model in (("source", source), ("target", target)):
            expected = meta.get(f"{role}_model")
            if expected is not None and expected != model.name:
                raise MapProvenanceError(
                    f"{where} was fitted with {role} model {expected!r}, not {model.name!r}; fit a map for {model.name!r}"
                )
            sha = meta.get(f"{role}_weights_sha256")
            if sha and model.weights_sha256 and sha != model.weights_sha256:
                raise MapProvenanceError(
                    f"{where} was fitted on {role} weights {sha[:12]}…, but {model.name!r} has weights "
                    f"{model.weights_sha256[:12]}…; refit the map for these weights"
                )
        if self.d_in != source.hidden_size or self.d_out != target.hidden_size:
            raise MapProvenanceError(
                f"{where} maps {self.d_in}→{self.d_out} but {source.name}→{target.name} needs "
                f"{source.hidden_size}→{target.hidden_size}"
            )
        for role, given in (("source", source_layer), ("target", target_layer)):
            expected = meta.get(f"{role}_layer")
            expected = -1 if expected == "embeddings" else expected
            if given is not None and isinstance(expected, int) and given != expected:
                raise MapProvenanceError(
                    f"{where} was fitted for {role} layer {expected}, not {given}; "
                    f"use the map fitted for layer {given} (see `patchscopes maps list`) or fit one"
                )

    def check_models(self, source_model: str | None = None, target_model: str | None = None) -> None:
        """Refuse to run with models other than the ones the map was fitted for."""
        for role, given in (("source_model", source_model), ("target_model", target_model)):
            expected = self.metadata.get(role)
            if given is not None and expected is not None and expected != given:
                raise MappingError(f"this map was fitted with {role} {expected!r}, not {given!r}; fit a map for {given!r}")


def mapping_device(mapping: Any, default: torch.device | str = "cpu") -> torch.device:
    """Where a mapping's weights live (an ``nn.Module``'s first parameter or buffer), else ``default``."""
    if isinstance(mapping, nn.Module):
        for t in list(mapping.parameters()) + list(mapping.buffers()):
            return t.device
    return torch.device(default)


def apply_mapping(mapping: Any, hidden: torch.Tensor, out_device: torch.device | str) -> torch.Tensor:
    """Run ``mapping`` on ``hidden`` where the mapping's weights are, and return the result on ``out_device``.

    >>> apply_mapping(lambda h: 2 * h, torch.ones(1, 4), "cpu")
    tensor([[2., 2., 2., 2.]])
    """
    with torch.no_grad():
        mapped = mapping(hidden.to(mapping_device(mapping, hidden.device)))
    return mapped.to(out_device)


def as_mapping(mapping: MappingLike | nn.Module | str | Path | None) -> MappingLike:
    """Normalise a user mapping: None → identity, a path → a saved :class:`AffineMap`, a callable as is."""
    if mapping is None:
        return Identity()
    if isinstance(mapping, (str, Path)):
        return AffineMap.load(mapping)
    if callable(mapping):
        return mapping
    raise MappingError(f"a mapping must be None, a callable, an nn.Module or a saved map path, not {type(mapping).__name__}")


def mapping_to_json(mapping: Any) -> Any:
    if mapping is None or isinstance(mapping, Identity):
        return None
    if isinstance(mapping, AffineMap) and "path" in mapping.metadata:
        return {"affine": mapping.metadata["path"]}
    if isinstance(mapping, (str, Path)):
        return {"affine": str(mapping)}
    return {"callable": getattr(mapping, "__qualname__", type(mapping).__name__)}


def mapping_from_json(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict) and "affine" in data:
        return AffineMap.load(data["affine"])
    if isinstance(data, dict) and "callable" in data:
        raise MappingError(
            f"the spec used a Python callable ({data['callable']}), which JSON cannot hold; "
            "pass it again with Patchscope.from_json(text, mapping=your_callable)"
        )
    raise MappingError(f"unknown mapping in JSON: {data!r}")
