"""Named affine maps on disk, with their provenance, refused with models they were not fitted for.

A store is a directory (default ``<cache root>/maps``; ``PATCHSCOPES_MAPS`` or the ``root`` argument
override it) holding one sub-directory per map name (``/`` in a name nests directories), each written by
:meth:`AffineMap.save <patchscopes.mappings.AffineMap.save>`.

    >>> from patchscopes.crossmodel.fit import fit_maps
    >>> amap = fit_maps(lm, lm_b, texts, pairs=[(1, 2)]).maps[(1, 2)]
    >>> store = MapStore("maps")
    >>> _ = store.save("a-to-b/L01-L02", amap)
    >>> store.load("a-to-b/L01-L02", source=lm, target=lm_b).weight.shape == (lm_b.hidden_size, lm.hidden_size)
    True
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from patchscopes.errors import MappingError
from patchscopes.layers import LayerSpec, resolve_layer
from patchscopes.mappings import AffineMap, MapProvenanceError  # noqa: F401  (re-exported)
from patchscopes.models.cache import cache_root
from patchscopes.models.loading import ModelHandle

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
LIST_COLUMNS = ["name", "source_model", "source_layer", "target_model", "target_layer", "r2", "n_fit", "corpus_sha256", "ridge"]


def default_root() -> Path:
    """``PATCHSCOPES_MAPS`` if set, else ``<cache root>/maps``."""
    env = os.environ.get("PATCHSCOPES_MAPS")
    return Path(env).expanduser() if env else cache_root() / "maps"


def _slug(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", model_name)


def pair_name(source: str, target: str, source_layer: int, target_layer: int, tag: str = "") -> str:
    """The conventional name of the map between two models' layers, e.g. ``SmolLM2-135M--Gemma-3-270M/L06-L04``."""
    group = f"{_slug(source)}--{_slug(target)}" + (f"-{_slug(tag)}" if tag else "")
    return f"{group}/L{source_layer:02d}-L{target_layer:02d}"


def check_provenance(
    amap: AffineMap,
    source: ModelHandle,
    target: ModelHandle,
    source_layer: LayerSpec | None = None,
    target_layer: LayerSpec | None = None,
) -> None:
    """Raise :class:`MapProvenanceError` unless ``amap`` was fitted from ``source`` to ``target`` (and layers)."""
    amap.check_provenance(
        source,
        target,
        None if source_layer is None else resolve_layer(source_layer, source.n_layers),
        None if target_layer is None else resolve_layer(target_layer, target.n_layers),
    )


class MapStore:
    """Save, list and load named :class:`AffineMap` artifacts under one root directory."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, name: str) -> Path:
        if not _NAME.match(name) or ".." in name:
            raise MappingError(f"map name {name!r} is not valid: use letters, digits, '._+-' and '/' between parts")
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / "map.json").is_file()

    def save(self, name: str, amap: AffineMap, overwrite: bool = False) -> Path:
        """Write ``amap`` under ``name``; an existing map is kept unless ``overwrite``."""
        if self.exists(name) and not overwrite:
            raise MappingError(f"a map named {name!r} already exists in {self.root}; pass overwrite=True or another name")
        return amap.save(self.path(name))

    def load(
        self,
        name: str,
        source: ModelHandle | None = None,
        target: ModelHandle | None = None,
        source_layer: LayerSpec | None = None,
        target_layer: LayerSpec | None = None,
    ) -> AffineMap:
        """Load a map by name; with models given, refuse it unless it was fitted for them."""
        if not self.exists(name):
            known = ", ".join(self.names()[:10]) or "none"
            raise MappingError(f"no map named {name!r} in {self.root} (known: {known}); fit one with `patchscopes maps fit`")
        amap = AffineMap.load(self.path(name))
        if source is not None and target is not None:
            check_provenance(amap, source, target, source_layer, target_layer)
        return amap

    def checkpoint_path(self, source: str, target: str, tag: str, pairs: Sequence[tuple[int, int]]) -> Path:
        """Where an unfinished fit of ``pairs`` between two models keeps its checkpoint (under ``partial/``)."""
        group = pair_name(source, target, 0, 0, tag).split("/")[0]
        pairs_id = hashlib.sha256(repr(sorted(pairs)).encode()).hexdigest()[:12]
        return self.root / "partial" / f"{group}-{pairs_id}.pt"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.relative_to(self.root).as_posix() for p in self.root.rglob("map.json"))

    def list(self) -> pd.DataFrame:
        """One row per saved map: name, models, layers, held-out R², fit size, corpus hash, ridge.
        A damaged map raises :class:`MappingError` naming its files (:meth:`scan` lists around it)."""
        frame, problems = self.scan()
        if problems:
            raise MappingError(next(iter(problems.values())))
        return frame

    def scan(self) -> tuple[pd.DataFrame, dict[str, str]]:
        """:meth:`list`'s table of the readable maps, and for each damaged one its name and what is wrong."""
        rows, problems = [], {}
        for name in self.names():
            try:
                meta = AffineMap.load(self.path(name)).metadata
            except MappingError as exc:
                problems[name] = str(exc)
                continue
            rows.append({"name": name, **{c: meta.get(c) for c in LIST_COLUMNS[1:]}})
        return pd.DataFrame(rows, columns=LIST_COLUMNS), problems
