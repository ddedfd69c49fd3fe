"""``load_model``: one handle (model, tokenizer, adapter) from a registry name, a local path or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscopes.errors import OptionError, PromptError, UnknownModelError
from patchscopes.models.adapters import Adapter, ArchSpec, spec_for
from patchscopes.models.cache import ensure_cache, weights_hash
from patchscopes.models.probes import probe
from patchscopes.models.registry import REGISTRY, find_registry_model

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Tokenized:
    """Token ids of one prompt with each token's character span in the text."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    text: str

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ModelHandle:
    """A loaded causal LM with its tokenizer and architecture adapter.

    >>> from patchscopes import load_model
    >>> lm = load_model("SmolLM2-135M")          # doctest: +SKIP
    >>> lm.n_layers, lm.hidden_size              # doctest: +SKIP
    (30, 576)
    """

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    source: str
    weights_sha256: str | None = None
    _cache: dict[str, Tokenized] = field(default_factory=dict, repr=False)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding (the width of the logits)."""
        return int(getattr(self.adapter.unembed, "out_features", 0) or self.tokenizer.vocab_size or 50_000)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(int(i) for i in gen_eos)
        return ids

    def tokenize(self, text: str) -> Tokenized:
        """Tokenize with character offsets (special tokens as the tokenizer adds them)."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"empty prompt {text!r}: give a prompt with at least one non-space character")
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        enc = self.tokenizer(text, return_offsets_mapping=True)
        result = Tokenized(ids=list(enc["input_ids"]), offsets=[tuple(o) for o in enc["offset_mapping"]], text=text)
        if len(self._cache) < 4096:
            self._cache[text] = result
        return result

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id decoded on its own (remembered per id: sweeps decode the same few thousand ids again and again)."""
        texts = self._token_texts
        for i in ids:
            if i not in texts:
                texts[i] = self.tokenizer.decode([i])
        return [texts[i] for i in ids]

    def __repr__(self) -> str:
        return (
            f"ModelHandle({self.name!r}, {type(self.model).__name__}, layers={self.n_layers}, "
            f"d={self.hidden_size}, dtype={self.dtype}, device={self.device})"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else Apple's MPS, else the CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from exc


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``auto`` is float32 on the CPU (bf16 matmuls are slow there) and bfloat16 on an accelerator.

    >>> resolve_dtype("auto", torch.device("cpu"))
    torch.float32
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def from_model(
    model: nn.Module,
    tokenizer: Any,
    name: str = "model",
    adapter: ArchSpec | None = None,
    source: str = "",
    check: bool = True,
) -> ModelHandle:
    """Wrap an already-loaded Hugging Face model and tokenizer (e.g. a tiny random model in tests).

    The layout comes from ``adapter`` or :func:`~patchscopes.models.adapters.spec_for`; with ``check`` (the
    default) the load-time probes of :mod:`patchscopes.models.probes` run once and raise
    :class:`~patchscopes.errors.ModelCheckError` if the library cannot read or write this model exactly.
    """
    model.eval()
    spec = adapter if adapter is not None else spec_for(model)
    handle = ModelHandle(model=model, tokenizer=tokenizer, adapter=Adapter(model, spec), name=name, source=source or name)
    if check:
        probe(handle)
    return handle


#: ``from_pretrained`` options that pick the files, which the tokenizer must share with the model
_SNAPSHOT_OPTIONS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")


def _tokenizer_kwargs(from_pretrained_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: from_pretrained_kwargs[key] for key in _SNAPSHOT_OPTIONS if key in from_pretrained_kwargs}


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    adapter: ArchSpec | None = None,
    check: bool = True,
    device_map: Any = None,
    **from_pretrained_kwargs: Any,
) -> ModelHandle:
    """Load a causal LM by registry name, local directory or Hugging Face hub id.

    Registry models (``patchscopes models`` lists them) are dequantised once into a verified
    safetensors cache. ``device`` and ``dtype`` take ``"auto"`` (see :func:`resolve_device`,
    :func:`resolve_dtype`); ``device_map=`` and other keyword arguments go to ``from_pretrained``, and those
    that say which files to read (``revision``, ``trust_remote_code``, ``token``, ``cache_dir``,
    ``local_files_only``, ``subfolder``) to the tokenizer's too, so that both come from the same snapshot.
    Hub ids work offline when their files are in the local Hugging Face cache.

    >>> lm = load_model("SmolLM2-135M")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    entry = find_registry_model(name_or_path)
    digest: str | None = None
    if entry is not None:
        directory = ensure_cache(entry)
        path, name = str(directory), entry.name
        digest = weights_hash(directory)
    elif os.path.isdir(name_or_path):
        path, name = name_or_path, Path(name_or_path).name
        if not (Path(path) / from_pretrained_kwargs.get("subfolder", "") / "config.json").is_file():
            raise UnknownModelError(
                f"{name_or_path} is not a model directory: it has no config.json (a Hugging Face checkpoint directory "
                "holds config.json, tokenizer files and weights); pass such a directory, a registry model "
                f"({', '.join(REGISTRY)}) or a hub id"
            )
    elif _looks_like_hub_id(name_or_path):
        path, name = name_or_path, name_or_path
    else:
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: not a registry model ({', '.join(REGISTRY)}), "
            "not an existing directory, and not a hub id of the form 'org/name'"
        )
    if device_map is not None:  # None: the whole model goes to ``device``
        from_pretrained_kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_tokenizer_kwargs(from_pretrained_kwargs))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **from_pretrained_kwargs)
    except OSError as exc:
        raise UnknownModelError(
            f"could not load model {name_or_path!r}: {exc}. Known registry models: {', '.join(REGISTRY)}; "
            "hub ids need network access or a local Hugging Face cache"
        ) from exc
    except Exception as exc:  # a user's directory: its files may be anything; say which directory, not a traceback
        if entry is not None or not os.path.isdir(name_or_path):
            raise
        raise UnknownModelError(
            f"could not load the model directory {name_or_path}: {type(exc).__name__}: {exc}; "
            "check that it is a complete Hugging Face checkpoint (config.json, tokenizer files, weights)"
        ) from exc
    if device_map is None:
        model.to(target_device)  # type: ignore[arg-type]
    handle = from_model(model, tokenizer, name=name, adapter=adapter, source=path, check=check)
    handle.weights_sha256 = digest
    return handle


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) in (1, 2) and all(p and not p.startswith(".") for p in parts) and " " not in name


def context_length(model: Any) -> int | None:
    """The most positions ``model`` (a :class:`~patchscopes.models.loading.ModelHandle`) attends over, if known."""
    config = getattr(getattr(model, "model", None), "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
