"""Load the relations JSON format (Hernandez et al.'s ``relations`` data, or a user's file of the same shape).

Each file: ``name``, ``prompt_templates`` (few-shot, with ``{}`` for the subject), ``prompt_templates_zs``
(zero-shot), ``properties`` and ``samples`` (``subject``/``object`` pairs). Some strings in the public data
are double-escaped (``Bras\\\\u00edlia``); they are unescaped here.

    >>> rel = load_relation(data_file("relations/factual/country_capital_city.json"))   # doctest: +SKIP
    >>> rel.samples[0]                                                                # doctest: +SKIP
    RelationSample(subject='United States', object='Washington D.C.')
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchscopes.datasets import data_dir
from patchscopes.errors import PatchscopeError


class DataFormatError(PatchscopeError, ValueError):
    """A data file that does not have the expected format; the message names file, line and field."""


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescape(text: str) -> str:
    """Undo double escaping such as ``Bras\\\\u00edlia`` → ``Brasília``."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


@dataclass(frozen=True)
class RelationSample:
    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    """One relation: templates with a ``{}`` subject slot and subject–object samples."""

    name: str
    prompt_templates: tuple[str, ...]
    prompt_templates_zs: tuple[str, ...]
    samples: tuple[RelationSample, ...]
    properties: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    path: str = ""

    @property
    def objects(self) -> list[str]:
        return sorted({s.object for s in self.samples})

    def __repr__(self) -> str:
        return f"Relation({self.name!r}, {len(self.samples)} samples, {len(self.objects)} objects)"


def _line_of(text: str, needle: str) -> int:
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 0


def load_relation(path: str | Path) -> Relation:
    """Read one relations JSON file, validating every field (errors name the file, line and field)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}, line 1: expected a JSON object with name, prompt_templates and samples")
    for key in ("name", "prompt_templates", "samples"):
        if key not in data:
            raise DataFormatError(f"{path}: missing field {key!r}")
    templates = data["prompt_templates"]
    zs = data.get("prompt_templates_zs") or templates
    for fieldname, values in (("prompt_templates", templates), ("prompt_templates_zs", zs)):
        if not isinstance(values, list) or not all(isinstance(t, str) and "{}" in t for t in values):
            raise DataFormatError(
                f"{path}, line {_line_of(text, fieldname)}, field {fieldname!r}: expected a list of strings containing '{{}}'"
            )
    samples = []
    for i, sample in enumerate(data["samples"]):
        if (
            not isinstance(sample, dict)
            or not isinstance(sample.get("subject"), str)
            or not isinstance(sample.get("object"), str)
        ):
            raise DataFormatError(
                f"{path}, line {_line_of(text, json.dumps(sample)[:30]) or _line_of(text, 'samples')}, samples[{i}]: "
                "expected an object with string fields 'subject' and 'object'"
            )
        samples.append(RelationSample(unescape(sample["subject"]).strip(), unescape(sample["object"]).strip()))
    return Relation(
        name=str(data["name"]),
        prompt_templates=tuple(unescape(t) for t in templates),
        prompt_templates_zs=tuple(unescape(t) for t in zs),
        samples=tuple(samples),
        properties=dict(data.get("properties") or {}),
        path=str(path),
    )


def load_relations(directory: str | Path | None = None) -> dict[str, Relation]:
    """Every relation under ``directory`` (default: ``<data dir>/relations``), keyed by name."""
    root = Path(directory) if directory is not None else data_dir() / "relations"
    files = sorted(root.rglob("*.json"))
    if not files:
        raise DataFormatError(f"no relation JSON files under {root}; set PATCHSCOPES_DATA or run `patchscopes data download`")
    return {rel.name: rel for rel in (load_relation(f) for f in files)}


def relations_named(
    names: Sequence[str], directory: str | Path | None = None, error: type[Exception] = DataFormatError
) -> list[Relation]:
    """The relations called ``names`` (their ``name`` field), in that order; an unknown name raises ``error``
    listing the available ones."""
    available = load_relations(directory)
    missing = [name for name in names if name not in available]
    if missing:
        raise error(f"unknown relation(s) {missing}; available: {', '.join(sorted(available))}")
    return [available[name] for name in names]
