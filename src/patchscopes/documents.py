"""A pinned corpus of whole documents: 12,000 PyPI project descriptions, fetched by release and checked by sha256.

The next-token evaluation of the Patchscopes paper (Fig. 2) draws its positions from whole Pile documents. The
Pile does not install from a package index; the long descriptions of PyPI releases do, wherever ``pip`` works.
``data/pypi_documents.csv.gz`` pins 12,000 of them (project, release version, sha256 of the description's UTF-8
bytes): distinct descriptions of at least 300 words, drawn with seed 0 from a seeded sample of 40,000 project
names of the index. :func:`build` (``patchscopes data documents``) fetches them into a JSON-lines file, one
``{"project", "version", "text"}`` object per line in manifest order, which ``--corpus`` reads.

    >>> entries = manifest_entries()
    >>> len(entries), entries[0] == sorted(entries)[0]
    (12000, True)
    >>> len(entries[0].sha256)
    64
"""

from __future__ import annotations

import concurrent.futures
import csv
import gzip
import hashlib
import http.client
import io
import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, NamedTuple

from patchscopes.errors import PatchscopeError
from patchscopes.files import atomic_write
from patchscopes.models.cache import cache_root
from patchscopes.progress import progress_bar

INDEX = "https://pypi.org/pypi"


class DocumentsUnavailableError(PatchscopeError, ConnectionError):
    """Not one pinned description could be fetched (no access to the package index)."""


class DocumentEntry(NamedTuple):
    project: str
    version: str
    sha256: str


@dataclass(frozen=True)
class BuildReport:
    path: Path
    written: int
    missing: tuple[str, ...]


def manifest_entries() -> list[DocumentEntry]:
    """The pinned (project, version, sha256) rows, sorted by project."""
    raw = resources.files("patchscopes").joinpath("data/pypi_documents.csv.gz").read_bytes()
    reader = csv.DictReader(io.StringIO(gzip.decompress(raw).decode("utf-8")))
    return [DocumentEntry(row["project"], row["version"], row["sha256"]) for row in reader]


def default_path() -> Path:
    """Where ``patchscopes data documents`` writes by default: ``<cache root>/documents/pypi-descriptions.jsonl``."""
    return cache_root() / "documents" / "pypi-descriptions.jsonl"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fetch_description(entry: DocumentEntry, timeout: float = 30.0) -> str | None:
    """The pinned release's description, or ``None`` when no URL serves text with the pinned sha256.

    The release's own URL comes first; some mirrors serve only the project's latest release, which is
    still the pinned one while the project has not released since."""
    for url in (f"{INDEX}/{entry.project}/{entry.version}/json", f"{INDEX}/{entry.project}/json"):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https host)
                info = json.load(response)["info"]
        except (OSError, http.client.HTTPException, ValueError, KeyError):  # OSError covers URLError and timeouts
            continue
        text = info.get("description") or ""
        if info.get("version") == entry.version and _sha256(text) == entry.sha256:
            return text
    return None


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _read_partial(path: Path, pinned: dict[str, DocumentEntry]) -> dict[str, str]:
    """Descriptions fetched by an interrupted build, kept only where they still match the manifest."""
    found: dict[str, str] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        entry = pinned.get(record.get("project", ""))
        if entry and record.get("version") == entry.version and _sha256(record.get("text", "")) == entry.sha256:
            found[entry.project] = record["text"]
    return found


def build(
    out: Path | None = None,
    entries: list[DocumentEntry] | None = None,
    fetch: Callable[[DocumentEntry], str | None] = fetch_description,
    workers: int = 8,
    progress: bool = True,
) -> BuildReport:
    """Fetch the pinned descriptions into ``out`` (JSON lines, manifest order); resumable, written atomically.

    ``fetch`` returns a description or ``None``; only text with the pinned sha256 is kept. Each kept
    description is appended to ``out.partial`` as it arrives, so an interrupted build continues where it
    stopped. Descriptions that no longer verify (a project deleted, or a mirror that serves only a newer
    release) are left out and named in the report; the evaluation then runs on the rest.
    """
    out = out or default_path()
    entries = entries if entries is not None else manifest_entries()
    pinned = {entry.project: entry for entry in entries}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(out)
    found = _read_partial(partial, pinned)
    todo = [entry for entry in entries if entry.project not in found]
    missing: list[str] = []
    with (
        partial.open("a", encoding="utf-8") as log,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
        progress_bar(len(todo), "documents", enabled=progress) as advance,
    ):
        for entry, text in zip(todo, pool.map(fetch, todo)):
            if text is None or _sha256(text) != entry.sha256:
                missing.append(entry.project)
            else:
                found[entry.project] = text
                log.write(json.dumps({"project": entry.project, "version": entry.version, "text": text}) + "\n")
                log.flush()
            advance(1)

    if entries and not found:
        partial.unlink(missing_ok=True)  # empty: nothing to resume from
        raise DocumentsUnavailableError(
            f"none of the {len(entries)} pinned descriptions could be fetched from {INDEX}: the package index is "
            "unreachable from here (or serves other releases); run the command where pip can reach PyPI"
        )

    def write(f: IO[str]) -> None:
        for entry in entries:
            if entry.project in found:
                record = {"project": entry.project, "version": entry.version, "text": found[entry.project]}
                f.write(json.dumps(record) + "\n")

    atomic_write(out, write)
    partial.unlink(missing_ok=True)
    return BuildReport(out, len(entries) - len(missing), tuple(missing))
