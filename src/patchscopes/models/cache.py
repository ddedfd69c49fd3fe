"""Dequantise a registry GGUF once into a verified safetensors directory.

The cache lives under ``$PATCHSCOPES_CACHE`` (default: ``$XDG_CACHE_HOME/patchscopes`` or
``~/.cache/patchscopes``). A cache directory is built in a temporary sibling and renamed into place
only when complete, with a ``manifest.json`` holding each file's size and sha256; a cache that fails
that check is rebuilt. Processes agree under a lock on who builds, and build directories left by a killed
build are removed by the next one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from patchscopes import compat
from patchscopes.errors import CacheError, ModelNotInstalledError
from patchscopes.files import file_lock
from patchscopes.models.registry import RegistryModel, sha256_file

MANIFEST = "manifest.json"
CACHE_FORMAT = 1


def cache_root() -> Path:
    """Root of the converted-model cache (``PATCHSCOPES_CACHE`` overrides it)."""
    env = os.environ.get("PATCHSCOPES_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "patchscopes"


def cache_dir(entry: RegistryModel) -> Path:
    return cache_root() / "models" / entry.name


def verify_cache(directory: Path, entry: RegistryModel) -> str | None:
    """Return None when ``directory`` is a complete cache of ``entry``, else the reason it is not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (never built, or the build was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest: {exc}"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("gguf_sha256") != entry.sha256:
        return "manifest from another format or another GGUF"
    for name, meta in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has size {path.stat().st_size}, expected {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def is_loadable(entry: RegistryModel) -> bool:
    """Whether :func:`~patchscopes.models.loading.load_model` can load ``entry`` without installing anything:
    its wheel is installed (the cache can be built) or a verified cache of it already exists."""
    if entry.is_installed():
        return True
    directory = cache_dir(entry)
    return directory.is_dir() and verify_cache(directory, entry) is None


def _log(message: str) -> None:
    print(f"[patchscopes] {message}", file=sys.stderr, flush=True)


#: The GGUF reader that transformers uses; the ``gguf`` extra (only a first conversion needs it).
GGUF_REQUIREMENT = "gguf>=0.10"


def gguf_available() -> bool:
    """Whether the GGUF reader is installed (a verified cache loads without it)."""
    return importlib.util.find_spec("gguf") is not None


def build_cache(entry: RegistryModel) -> Path:
    """Convert the GGUF of ``entry`` to safetensors (atomically) and return the cache directory."""
    if not gguf_available():
        raise ModelNotInstalledError(
            f"converting {entry.name} on first use reads its GGUF file with the gguf package, which is not installed: "
            f'pip install "patchscopes[gguf]" (or run `patchscopes models install {entry.name}`, which adds it)'
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = cache_dir(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _log(f"first use of {entry.name}: dequantising its GGUF into {final} (once; about a minute)")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{entry.name}.build-") as tmp:
        work = Path(tmp)
        gguf = entry.gguf(work)
        out = work / "model"
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        compat.drop_quantizer(model)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir()) if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "model": entry.name, "gguf_sha256": entry.sha256, "files": files}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    if (reason := verify_cache(final, entry)) is not None:
        raise CacheError(f"cache of {entry.name} at {final} failed verification right after building: {reason}")
    _log(f"{entry.name} cached in {time.time() - started:.0f} s")
    return final


def ensure_cache(entry: RegistryModel) -> Path:
    """Return a verified cache directory of ``entry``, building or rebuilding it when needed."""
    directory = cache_dir(entry)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f".{entry.name}.lock"):  # one builder; the others wait, then verify
        remove_stale_builds(entry)
        if directory.exists():
            reason = verify_cache(directory, entry)
            if reason is None:
                return directory
            _log(f"cache of {entry.name} at {directory} is damaged ({reason}); rebuilding it")
        return build_cache(entry)


def stale_builds(entry: RegistryModel) -> list[Path]:
    """Build directories of ``entry`` in the cache (stale when no build holds the entry's lock)."""
    parent = cache_dir(entry).parent
    return sorted(parent.glob(f".{entry.name}.build-*")) if parent.is_dir() else []


def remove_stale_builds(entry: RegistryModel) -> None:
    """Remove what killed builds of ``entry`` left behind (call it holding the entry's lock)."""
    for path in stale_builds(entry):
        _log(f"removing {path}, left by an interrupted build of {entry.name}")
        shutil.rmtree(path, ignore_errors=True)


def weights_hash(directory: Path) -> str | None:
    """Combined sha256 of a cache's weight files, as recorded in its manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    files = json.loads(manifest_path.read_text())["files"]
    return "".join(meta["sha256"][:16] for name, meta in sorted(files.items()) if name.endswith(".safetensors"))
