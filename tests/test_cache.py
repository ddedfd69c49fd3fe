"""The converted-weights cache: verified by manifest, a damaged or half-built cache is detected and rebuilt."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from patchscopes.errors import UnknownModelError
from patchscopes.models import cache
from patchscopes.models.registry import REGISTRY, require_registry_model


def test_registry_lookup():
    assert require_registry_model("smollm2").name == "SmolLM2-135M"
    with pytest.raises(UnknownModelError, match="known: SmolLM2-135M"):
        require_registry_model("nope")


def test_damaged_cache_is_detected_and_rebuilt(smol, tmp_path, monkeypatch):
    entry = REGISTRY["SmolLM2-135M"]
    original = cache.cache_dir(entry)
    monkeypatch.setenv("PATCHSCOPES_CACHE", str(tmp_path))
    copy = cache.cache_dir(entry)
    shutil.copytree(original, copy)
    assert cache.verify_cache(copy, entry) is None
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:  # flip bytes in the middle: same size, different content
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    assert "sha256" in (cache.verify_cache(copy, entry) or "")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert "size" in (cache.verify_cache(copy, entry) or "")
    (copy / cache.MANIFEST).unlink()  # as if a build had been interrupted before its last step
    assert "no manifest" in (cache.verify_cache(copy, entry) or "")
    rebuilt = cache.ensure_cache(entry)
    assert rebuilt == copy and cache.verify_cache(rebuilt, entry) is None
    assert not cache.stale_builds(entry), "no temporary build directory left"

    from patchscopes import load_model

    lm = load_model("SmolLM2-135M")
    assert lm.weights_sha256 == smol.weights_sha256


def test_a_build_killed_midway_leaves_nothing_after_the_next_run(smol, tmp_path, monkeypatch):
    """Regression: kill -9 during a cache rebuild left a 517 MB build directory behind for good."""
    entry = REGISTRY["SmolLM2-135M"]
    original = cache.cache_dir(entry)
    monkeypatch.setenv("PATCHSCOPES_CACHE", str(tmp_path))
    models = cache.cache_dir(entry).parent
    models.mkdir(parents=True)
    code = "from patchscopes.models import cache, registry; cache.build_cache(registry.REGISTRY['SmolLM2-135M'])"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PATCHSCOPES_CACHE": str(tmp_path)})
    deadline = time.time() + 120
    while not any(p.iterdir() for p in cache.stale_builds(entry)) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until the build has started writing
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert cache.stale_builds(entry), "the kill came after the build finished: nothing to clean up"
    cache.cache_dir(entry).symlink_to(original)  # the next run finds a verified cache (no second minute-long build)
    assert cache.ensure_cache(entry) == cache.cache_dir(entry)
    assert not cache.stale_builds(entry)
