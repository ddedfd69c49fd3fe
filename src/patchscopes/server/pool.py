"""Models by allow-listed name (loaded once, lazily) and the fitted maps that allow cross-model patching.

>>> pool = ModelPool(["SmolLM2-135M"])        # doctest: +SKIP
>>> pool.get("SmolLM2-135M").n_layers          # doctest: +SKIP
30
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from patchscopes.mappings import AffineMap
from patchscopes.models.loading import ModelHandle
from patchscopes.models.registry import find_registry_model
from patchscopes.server.errors import ModelNotAllowedError, ServerError

Loader = Callable[[str], ModelHandle]


class MapError(ServerError):
    """A requested model pair or layer pair with no fitted map."""

    status = 422
    kind = "no_map"


def _registry_loader(name: str) -> ModelHandle:
    from patchscopes.models.loading import load_model

    return load_model(name)


class ModelPool:
    """The allow-list: names the browser may use, each loaded at most once (thread-safe)."""

    def __init__(self, allowed: Sequence[str], loader: Loader | None = None) -> None:
        if not allowed:
            raise ServerError("no models allowed: start the server with at least one model, e.g. --models SmolLM2-135M")
        self.allowed = list(dict.fromkeys(allowed))
        self._loader = loader or _registry_loader
        self._models: dict[str, ModelHandle] = {}
        self._load_locks = {name: threading.Lock() for name in self.allowed}
        #: one lock per model: patching installs hooks on its blocks, so runs on one model never overlap
        self.run_locks = {name: threading.Lock() for name in self.allowed}

    def check(self, name: str) -> str:
        if name not in self._load_locks:
            raise ModelNotAllowedError(f"model {name!r} is not allowed on this server; allowed: {', '.join(self.allowed)}")
        return name

    def get(self, name: str) -> ModelHandle:
        """The loaded model for an allow-listed name (loads it on first use)."""
        self.check(name)
        with self._load_locks[name]:
            if name not in self._models:
                self._models[name] = self._loader(name)
            return self._models[name]

    def loaded(self, name: str) -> bool:
        return name in self._models

    def info(self, name: str) -> dict[str, Any]:
        """Name, layers and width, from the registry when the model is not loaded yet."""
        entry = find_registry_model(name)
        if name in self._models or entry is None:
            lm = self.get(name)
            return {"name": name, "n_layers": lm.n_layers, "hidden_size": lm.hidden_size, "loaded": True}
        return {"name": name, "n_layers": entry.n_layers, "hidden_size": entry.hidden_size, "loaded": False}


class MapIndex:
    """Fitted affine maps keyed by (source model, target model) and optionally by layer pair.

    A map's metadata must name ``source_model`` and ``target_model``; with ``source_layer`` and
    ``target_layer`` it serves that pair only, without them it serves every pair.
    """

    def __init__(self, maps: Sequence[AffineMap] = ()) -> None:
        self._maps: dict[tuple[str, str], dict[tuple[int, int] | None, AffineMap]] = {}
        for m in maps:
            src, tgt = m.metadata.get("source_model"), m.metadata.get("target_model")
            if not src or not tgt:
                raise MapError(
                    f"map {m!r} has no source_model/target_model in its metadata; "
                    "refit it with AffineMap.fit(..., source_model=, target_model=)"
                )
            layer, target_layer = m.metadata.get("source_layer"), m.metadata.get("target_layer")
            key = (layer, target_layer) if isinstance(layer, int) and isinstance(target_layer, int) else None
            self._maps.setdefault((src, tgt), {})[key] = m

    def pairs(self) -> list[dict[str, Any]]:
        out = []
        for (src, tgt), by_layer in sorted(self._maps.items()):
            layers = "any" if None in by_layer else sorted([list(k) for k in by_layer if k is not None])
            out.append({"source": src, "target": tgt, "layers": layers})
        return out

    def lookup(self, source: str, target: str, layer: int, target_layer: int) -> AffineMap:
        by_layer = self._maps.get((source, target))
        if not by_layer:
            raise MapError(
                f"no fitted map from {source!r} to {target!r} is loaded; start the server with --map DIR for that pair"
            )
        found = by_layer.get((layer, target_layer)) or by_layer.get(None)
        if found is None:
            have = ", ".join(f"{a}→{b}" for a, b in sorted(k for k in by_layer if k is not None))
            raise MapError(
                f"no map from {source!r} layer {layer} to {target!r} layer {target_layer}; maps exist for layers {have}"
            )
        return found

    def for_request(self, source: str, target: str) -> Callable[[Any, Any], AffineMap]:
        """A ``(ℓ, ℓ*) → map`` callable in the form :func:`patchscopes.sweep.sweep` accepts per layer pair."""

        def per_pair(layer: Any, target_layer: Any) -> AffineMap:
            return self.lookup(source, target, int(layer), int(layer if target_layer == "same" else target_layer))

        per_pair.per_layer_pair = True  # type: ignore[attr-defined]
        return per_pair
