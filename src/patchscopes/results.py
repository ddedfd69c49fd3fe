"""A results store that survives a crash: each unit of work is appended as one JSON line.

A run directory holds ``config.json`` (every parameter, model and weight hash, package versions, seed)
and one ``<table>.jsonl`` per table. Each line is one completed *unit* (say, one example) with all its
rows, written with a single ``write`` and ``fsync``; a line torn by a crash does not parse and its unit
is simply redone. :meth:`ResultStore.pack` folds the units into ``<table>.jsonl.gz``: a compressed copy to
commit or share that the store reads as it reads its own lines, so a packed run resumes where it stopped.
Re-opening the directory with a different configuration is refused; processes that open one directory at
once agree on its configuration under a lock. A unit whose rows lack a column the table's schema
requires is redone too, with one warning line.

    >>> store = ResultStore("runs/demo", {"model": "SmolLM2-135M", "seed": 0})
    >>> for key in range(3):
    ...     if not store.done("rows", key):
    ...         store.append("rows", key, [{"example": key, "score": key / 2}])
    >>> df = store.frame("rows")
    >>> df.score.tolist()
    [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import platform
import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from patchscopes.errors import OptionError, PatchscopeError
from patchscopes.files import atomic_path, atomic_write_text, file_lock


class ConfigMismatchError(PatchscopeError, ValueError):
    """A run directory already holds results of a different configuration."""


class CorruptRunError(PatchscopeError, ValueError):
    """A run directory's ``config.json`` is unreadable, so its results cannot be trusted or resumed."""


def package_versions(names: Iterable[str] = ("patchscopes", "torch", "transformers", "pandas", "numpy")) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def dtype_entry(dtype: object) -> dict[str, str]:
    """What a run's configuration records of its numerics: ``{"dtype": name}``, left out for float32.

    Run directories made before the dtype was recorded hold no entry and resume as float32 runs. A run
    resumed in another dtype differs in ``dtype`` and is refused, so float32 and bfloat16 units never mix.

    >>> dtype_entry("float32"), dtype_entry("torch.bfloat16")
    ({}, {'dtype': 'bfloat16'})
    """
    name = str(dtype).removeprefix("torch.")
    return {} if name == "float32" else {"dtype": name}


def model_entry(lm: Any) -> dict[str, Any]:
    """A loaded model's part of a run configuration: its weight hash and its :func:`dtype_entry`."""
    return {"weights_sha256": lm.weights_sha256, **dtype_entry(lm.dtype)}


def read_config(path: Path) -> dict[str, Any]:
    """The ``config`` a run's ``config.json`` records, or :class:`CorruptRunError` saying how to recover."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError("it has no 'config' object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRunError(
            f"{path} is not a run configuration ({exc}); its results cannot be resumed: "
            f"delete {path.parent} to start over, or use a new --out directory"
        ) from None
    return saved["config"]


def _key(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


class ResultStore:
    """Append-only, resumable tables under one run directory with a fixed configuration."""

    def __init__(
        self,
        directory: str | Path,
        config: dict[str, Any],
        environment: dict[str, Any] | None = None,
        schemas: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """``schemas``: per table, the columns every row must have; a unit with a row missing one is redone."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = json.loads(json.dumps(config, default=str))
        self.schemas = {table: frozenset(columns) for table, columns in (schemas or {}).items()}
        path = self.directory / "config.json"
        with file_lock(self.directory / ".config.lock"):  # one writer; the others then read what it wrote
            if path.is_file():
                self._check_config(path)
            else:
                record = {"config": self.config, "environment": environment or package_versions()}
                atomic_write_text(path, json.dumps(record, indent=2, default=str))
        self._done: dict[str, set[str]] = {}

    @classmethod
    def reopen(cls, directory: str | Path, schemas: Mapping[str, Iterable[str]] | None = None) -> ResultStore:
        """The store of an existing run directory, with the configuration it was started with."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CorruptRunError(
                f"{directory} is not a run directory (no config.json): run an evaluation with --out {directory}"
            )
        return cls(directory, read_config(path), schemas=schemas)

    def _check_config(self, path: Path) -> None:
        saved = read_config(path)
        if saved != self.config:
            changed = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
            raise ConfigMismatchError(
                f"{self.directory} holds results of another configuration (differs in: {', '.join(changed)}); "
                "use a new --out directory, or delete this one to start over"
            )

    def _path(self, table: str) -> Path:
        return self.directory / f"{table}.jsonl"

    def _packed_path(self, table: str) -> Path:
        return self.directory / f"{table}.jsonl.gz"

    def _units(self, table: str) -> Iterable[dict[str, Any]]:
        """The valid units of ``table``: the packed ones first, then the lines appended since."""
        yield from self._file_units(self._packed_path(table), table)
        yield from self._file_units(self._path(table), table)

    def _file_units(self, path: Path, table: str) -> Iterable[dict[str, Any]]:
        if not path.is_file():
            return
        bad: list[str] = []
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    unit = json.loads(line)
                except json.JSONDecodeError:
                    if line.endswith("\n"):  # a whole line of garbage, not one torn by an interruption
                        bad.append(f"line {number} is not JSON")
                    continue
                problem = self._unit_problem(table, unit)
                if problem is None:
                    yield unit
                else:
                    bad.append(f"line {number} {problem}")
        if bad:
            warnings.warn(
                f"{path}: {len(bad)} unit(s) do not match the run's schema and will be redone ({bad[0]})",
                stacklevel=3,
            )

    def _unit_problem(self, table: str, unit: Any) -> str | None:
        """Why a parsed line is not a unit of ``table`` (None when it is one)."""
        if not isinstance(unit, dict) or not isinstance(unit.get("key"), str) or not isinstance(unit.get("rows"), list):
            return "is not a {key, rows} unit"
        if not all(isinstance(row, dict) for row in unit["rows"]):
            return "has rows that are not objects"
        required = self.schemas.get(table)
        for row in unit["rows"] if required else ():
            missing = required - row.keys()  # type: ignore[operator]
            if missing:
                return f"has a row without {', '.join(sorted(missing))}"
        return None

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

    def _unique_units(self, table: str) -> Iterable[dict[str, Any]]:
        """The units of ``table``, each key once (its first record), in the order they were written."""
        seen: set[str] = set()
        for unit in self._units(table):
            if unit["key"] not in seen:
                seen.add(unit["key"])
                yield unit

    def frame(self, table: str) -> pd.DataFrame:
        """All rows of a table, each unit once, in the order the units were written."""
        return pd.DataFrame([row for unit in self._unique_units(table) for row in unit["rows"]])

    def tables(self) -> list[str]:
        """The names of the tables this directory holds, packed or not."""
        files = [*self.directory.glob("*.jsonl"), *self.directory.glob("*.jsonl.gz")]
        return sorted({p.name.removesuffix(".gz").removesuffix(".jsonl") for p in files})

    def pack(self) -> list[Path]:
        """Fold each table's units (each once, in the order written) into ``<table>.jsonl.gz`` and remove its
        ``<table>.jsonl``; return the packed files. The directory stays a run directory: reopened with the same
        configuration it resumes from the packed units. Pack only a run that no process is writing to.

        >>> store = ResultStore("runs/demo-pack", {"seed": 0})
        >>> store.append("rows", 0, [{"x": 1}])
        >>> [p.name for p in store.pack()], ResultStore("runs/demo-pack", {"seed": 0}).done("rows", 0)
        (['rows.jsonl.gz'], True)
        """
        packed = []
        for table in self.tables():
            lines = [json.dumps(unit, default=_jsonable) + "\n" for unit in self._unique_units(table)]
            target = self._packed_path(table)
            # no file name or time in the gzip header: the same units always pack to the same bytes
            with atomic_path(target) as tmp, open(tmp, "wb") as raw:
                with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
                    f.write("".join(lines).encode("utf-8"))
            self._path(table).unlink(missing_ok=True)
            packed.append(target)
        return packed

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``name`` in the run directory, atomically."""
        return atomic_write_text(self.directory / name, json.dumps(data, indent=2, default=_jsonable))

    def write_csv(self, name: str, frame: pd.DataFrame, index: bool = False) -> Path:
        """Write ``frame`` as ``name`` in the run directory, atomically."""
        return write_csv(self.directory / name, frame, index=index)


def _holds_carriage_return(frame: pd.DataFrame) -> bool:
    text = frame.select_dtypes(exclude="number")
    return any(text[column].astype(str).str.contains("\r", regex=False).any() for column in text.columns)


def write_csv(path: str | Path, frame: pd.DataFrame, index: bool = False) -> Path:
    """Write ``frame`` to ``path`` as CSV, atomically: a kill leaves the old file or the new one, never a torn one.

    pandas quotes a field that holds a newline but not one that holds a lone carriage return (a token of its
    own in many vocabularies), which readers then take for a line break; a frame with one gets every text
    field quoted.
    """
    with atomic_path(path) as tmp:
        if _holds_carriage_return(frame):
            frame.to_csv(tmp, index=index, quoting=csv.QUOTE_NONNUMERIC)
        else:
            frame.to_csv(tmp, index=index)
    return Path(path)


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` to ``path`` as Parquet, atomically. Unlike CSV, list columns (``top_tokens``,
    ``top_probs``) stay lists and numbers keep their types; read it back with ``pd.read_parquet``.

    Needs pyarrow: ``pip install "patchscopes[parquet]"``.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise OptionError('Parquet export needs pyarrow: pip install "patchscopes[parquet]" (or write CSV instead)') from exc
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
