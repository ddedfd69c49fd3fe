from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "PATCHSCOPES_DATA" not in os.environ and _SHARED_DATA.is_dir():
    os.environ["PATCHSCOPES_DATA"] = str(_SHARED_DATA)

from patchscopes.models.registry import find_registry_model  # noqa: E402
from tiny import ARCHS, tiny_model  # noqa: E402

REAL_MODEL = "SmolLM2-135M"


@pytest.fixture
def draw_constrained_figure():  # noqa: ANN201
    """Draws one constrained-layout figure (kiwisolver's solver runs): raises if the process's copy is broken."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw() -> None:
        fig, _ = plt.subplots(layout="constrained")
        fig.canvas.draw()
        plt.close(fig)

    return draw


@pytest.fixture(params=ARCHS)
def tiny(request: pytest.FixtureRequest):  # noqa: ANN201
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smol():  # noqa: ANN201
    entry = find_registry_model(REAL_MODEL)
    if entry is None or not entry.is_installed():
        pytest.skip(f"{REAL_MODEL} is not installed: run `patchscopes models install {REAL_MODEL}`")
    from patchscopes import load_model

    return load_model(REAL_MODEL)


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-gemma3_text", "smol"])
def any_model(request: pytest.FixtureRequest):  # noqa: ANN201
    if request.param == "smol":
        return request.getfixturevalue("smol")
    return tiny_model(request.param.removeprefix("tiny-"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The papers' data directory; tests that need it skip with the reason when it is absent."""
    from patchscopes.datasets import data_dir

    root = data_dir()
    if not (root / "relations").is_dir() or not (root / "patchscopes").is_dir():
        pytest.skip(f"the papers' data is not under {root}: set PATCHSCOPES_DATA or run `patchscopes data download`")
    return root
