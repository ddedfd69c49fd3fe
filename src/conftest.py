"""The names the docstring examples use, for ``python -m pytest --doctest-modules src/patchscopes``.

In the examples ``lm`` stands for a loaded model (``lm = load_model("SmolLM2-135M")``), ``lm_b`` for a second
one, ``texts`` for a list of strings and ``prompts`` for one relation's prompts. Here ``lm`` is a tiny
random-weight llama (4 blocks, width 32) from ``tests/tiny.py``, so the outputs the examples show are shapes,
types and counts, never a real model's words. Each example runs in its own temporary working directory, so
paths such as ``runs/demo`` are written there. A module whose optional dependency is missing is not collected.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: Modules (paths under src/patchscopes) and the optional dependency each needs to be imported at all.
_NEEDS = {"server": "fastapi", "backends/nnsight": "nnsight", "backends/ray_sweep": "ray", "evals/probing": "sklearn"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    rel = collection_path.as_posix().split("src/patchscopes/", 1)[-1]
    for prefix, module in _NEEDS.items():
        if rel.startswith(prefix) and importlib.util.find_spec(module) is None:
            return True
    return None


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from patchscopes.relations.prompts import RelationPrompt
    from tiny import CORPUS, tiny_model

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    doctest_namespace.update(
        torch=torch,
        lm=tiny_model("llama"),
        lm_b=tiny_model("llama", seed=1, hidden=48),  # a second model, wider: for maps between two models
        texts=list(dict.fromkeys(CORPUS)) * 4,  # 20 short texts
        prompts=[  # one relation's prompts (relations.prompts.RelationPrompt)
            RelationPrompt("capital", "France", "Paris", "The capital of Japan is Tokyo. The capital of France is"),
            RelationPrompt("capital", "Japan", "Tokyo", "The capital of France is Paris. The capital of Japan is"),
        ],
    )
