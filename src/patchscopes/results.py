"""A results store that survives a crash: each unit of work is appended as one JSON line.

A run directory holds ``config.json`` (every parameter, model and weight hash, package versions, seed)
and one ``<table>.jsonl`` per table. Each line is one completed *unit* (say, one example) with all its
rows, written with a single ``write`` and ``fsync``; a line torn by a crash does not parse and its unit
is simply redone. Re-opening the directory with a different configuration is refused.

    >>> store = ResultStore("runs/demo", {"model": "SmolLM2-135M", "seed": 0})   # doctest: +SKIP
    >>> for unit in work:                                                       # doctest: +SKIP
    ...     if not store.done("rows", unit.key):
    ...         store.append("rows", unit.key, compute(unit))
    >>> df = store.frame("rows")                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.errors import PatchscopeError


class ConfigMismatchError(PatchscopeError, ValueError):
    """A run directory already holds results of a different configuration."""


def package_versions(names: Iterable[str] = ("patchscopes", "torch", "transformers", "pandas", "numpy")) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def _key(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


class ResultStore:
    """Append-only, resumable tables under one run directory with a fixed configuration."""

    def __init__(self, directory: str | Path, config: dict[str, Any], environment: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = json.loads(json.dumps(config, default=str))
        path = self.directory / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("config") != self.config:
                changed = sorted(
                    k
                    for k in set(saved.get("config", {})) | set(self.config)
                    if saved.get("config", {}).get(k) != self.config.get(k)
                )
                raise ConfigMismatchError(
                    f"{self.directory} holds results of another configuration (differs in: {', '.join(changed)}); "
                    "use a new --out directory, or delete this one to start over"
                )
        else:
            record = {"config": self.config, "environment": environment or package_versions()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=str))
            os.replace(tmp, path)
        self._done: dict[str, set[str]] = {}

    def _path(self, table: str) -> Path:
        return self.directory / f"{table}.jsonl"

    def _units(self, table: str) -> Iterable[dict[str, Any]]:
        path = self._path(table)
        if not path.is_file():
            return
        with path.open() as f:
            for line in f:
                try:
                    unit = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn by an interruption: that unit is redone
                if isinstance(unit, dict) and "key" in unit and "rows" in unit:
                    yield unit

    def done_keys(self, table: str) -> set[str]:
        if table not in self._done:
            self._done[table] = {u["key"] for u in self._units(table)}
        return self._done[table]

    def done(self, table: str, key: Any) -> bool:
        return _key(key) in self.done_keys(table)

    def append(self, table: str, key: Any, rows: list[dict[str, Any]]) -> None:
        """Record one completed unit and its rows (a unit already recorded is ignored)."""
        k = _key(key)
        if k in self.done_keys(table):
            return
        line = json.dumps({"key": k, "rows": rows}, default=_jsonable) + "\n"
        path = self._path(table)
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line  # a torn line before: start on a fresh one
        with path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done_keys(table).add(k)

    def frame(self, table: str) -> pd.DataFrame:
        """All rows of a table, each unit once, in the order the units were written."""
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        for unit in self._units(table):
            if unit["key"] in seen:
                continue
            seen.add(unit["key"])
            rows.extend(unit["rows"])
        return pd.DataFrame(rows)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
        os.replace(tmp, path)
        return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
