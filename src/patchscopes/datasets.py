"""Where the papers' public data lives, and fetching it by pinned commit and sha256.

Lookup order for the data directory:

1. the ``PATCHSCOPES_DATA`` environment variable (a directory laid out like ``relations/…``,
   ``patchscopes/…``, ``paper_tables/…``);
2. the download cache ``<cache root>/data`` (see :func:`patchscopes.models.cache.cache_root`), filled by
   :func:`download` (``patchscopes data download``) from the pinned commits in ``data/manifest.json``.

    >>> path = data_file("relations/factual/country_capital_city.json")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from patchscopes.errors import PatchscopeError
from patchscopes.models.cache import cache_root


class DataNotFoundError(PatchscopeError, FileNotFoundError):
    """A data file is neither in ``PATCHSCOPES_DATA`` nor in the download cache."""


def manifest() -> dict[str, Any]:
    """The pinned sources and per-file sha256 of the public data the evaluations read."""
    return json.loads(resources.files("patchscopes").joinpath("data/manifest.json").read_text())


def data_dir() -> Path:
    """The directory data is read from (``PATCHSCOPES_DATA`` if set, else the download cache)."""
    env = os.environ.get("PATCHSCOPES_DATA")
    if env:
        return Path(env).expanduser()
    return cache_root() / "data"


def data_file(relative: str) -> Path:
    """Path of one data file, e.g. ``"patchscopes/factual/country_currency.tsv"``; a clear error if absent."""
    path = data_dir() / relative
    if not path.is_file():
        raise DataNotFoundError(
            f"data file {relative!r} not found under {data_dir()}. Set PATCHSCOPES_DATA to a directory holding "
            "the papers' data, or run `patchscopes data download` (needs network access)."
        )
    return path


def data_files(prefix: str, suffix: str = "") -> list[Path]:
    """All files of the manifest under ``prefix`` (e.g. ``"relations/"``) that exist locally."""
    root = data_dir()
    names = [n for n in manifest()["files"] if n.startswith(prefix) and n.endswith(suffix)]
    return [root / n for n in names if (root / n).is_file()]


def have_data(relative: str = "relations") -> bool:
    return (data_dir() / relative).exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(target: Path | None = None, force: bool = False) -> Path:
    """Fetch every public file of the manifest by pinned commit, checking sha256; atomic per file."""
    root = target or (cache_root() / "data")
    for name, meta in manifest()["files"].items():
        if meta.get("url") is None:
            continue  # transcribed tables ship with the package's docs, not from a repository
        dest = root / name
        if dest.is_file() and not force and _sha256(dest) == meta["sha256"]:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(meta["url"], timeout=60) as response:  # noqa: S310 (pinned https URLs)
            body = response.read()
        digest = hashlib.sha256(body).hexdigest()
        if digest != meta["sha256"]:
            raise DataNotFoundError(f"{meta['url']} has sha256 {digest}, expected {meta['sha256']}; refusing it")
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
            tmp.write(body)
        os.replace(tmp.name, dest)
    return root
