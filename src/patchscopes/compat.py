"""The one module that touches transformers internals which move between releases.

Everything else in the library calls these functions instead of reaching into transformers itself, so a
new release that renames something is mended here, once, and ``tests/test_compat.py`` checks each function
on the installed release (CI runs it on the oldest supported and the newest release too).

What moved, and what this module hides:

- the KV cache object: its class, its per-layer storage, and the keyword a model and each decoder layer
  receive it under (``past_key_values`` up to 5.23, ``cache`` from 5.24), and the output field it comes
  back in;
- ``logits_to_keep`` (not every model's ``forward`` accepts it);
- the attention-implementation switch (the Jacobians of :mod:`patchscopes.relations` need eager attention);
- custom 4-D attention masks (additive, in the model's dtype);
- the quantizer flag a GGUF-loaded model carries.

>>> from patchscopes import compat
>>> compat.find_cache((), {"cache": None, "layer_past": None}) is None
True
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: Keywords under which a model or a decoder layer has received its KV cache, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


def is_cache(obj: object) -> bool:
    """Whether ``obj`` is a transformers KV cache (any release: a ``Cache`` subclass, or one duck-typed like it)."""
    from transformers.cache_utils import Cache

    if isinstance(obj, Cache):
        return True
    return hasattr(obj, "update") and (hasattr(obj, "layers") or hasattr(obj, "key_cache"))


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Any | None:
    """The KV cache a decoder layer was called with, whatever keyword (or position) it came under; else None."""
    for keyword in CACHE_KEYWORDS:
        value = kwargs.get(keyword)
        if value is not None and is_cache(value):
            return value
    for value in (*kwargs.values(), *args):
        if is_cache(value):
            return value
    return None


_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(cls: type) -> frozenset[str]:
    """The parameter names of ``cls.forward`` (kept per class: inspecting a signature is slow)."""
    if cls not in _PARAMETERS:
        try:
            _PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)  # type: ignore[attr-defined]
        except (TypeError, ValueError, AttributeError):
            _PARAMETERS[cls] = frozenset()
    return _PARAMETERS[cls]


def cache_keyword(model: nn.Module) -> str:
    """The keyword the model's ``forward`` takes its cache under (``cache`` from transformers 5.24)."""
    params = _forward_parameters(type(model))
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to pass a cache to ``model(...)`` on the installed release."""
    return {cache_keyword(model): cache}


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_cache(model: nn.Module) -> Any:
    """An empty dynamic cache for ``model`` (configured from its config where the release allows)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)  # type: ignore[arg-type]
    except TypeError:  # pragma: no cover - releases before the config argument
        return DynamicCache()


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer entries of a dynamic cache, each with ``keys`` and ``values`` tensors."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: it has no per-layer entries")
    return list(layers)


def layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[B, heads, T, head_dim]`` stored for decoder layer ``index``."""
    layer = cache_layers(cache)[index]
    return layer.keys, layer.values


def set_layer_kv(cache: Any, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace the keys and values stored for decoder layer ``index``."""
    layer = cache_layers(cache)[index]
    layer.keys, layer.values = keys, values


def append_kv(cache: Any, keys: torch.Tensor, values: torch.Tensor, index: int) -> None:
    """Append keys and values to decoder layer ``index`` of the cache, as the layer itself would."""
    cache.update(keys, values, index)


def select_rows(cache: Any, rows: torch.Tensor) -> bool:
    """Keep only batch ``rows`` of a KV cache, in place; False (and nothing changed) where it holds other state.

    A cache of recurrent layers (no ``keys``) is left whole: the caller keeps feeding those rows instead.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        return False
    for layer in layers:
        if layer.keys is not None and layer.keys.numel():
            at = rows.to(layer.keys.device)  # a model split over devices keeps each layer's cache on its own
            layer.keys, layer.values = layer.keys[at], layer.values[at]
    return True


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (compute the logits of the last positions only)."""
    return "logits_to_keep" in _forward_parameters(type(model))


def logits_to_keep_kwargs(model: nn.Module, n: int = 1) -> dict[str, int]:
    """``{"logits_to_keep": n}`` where the model takes it, else ``{}`` (it then returns every position)."""
    return {"logits_to_keep": n} if accepts_logits_to_keep(model) else {}


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation the model runs (``eager``, ``sdpa``, …), or None when it does not say."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextmanager
def using_attention(model: nn.Module, implementation: str = "eager") -> Iterator[bool]:
    """Temporarily run ``model`` with another attention implementation; restores the previous one.

    Yields whether the switch happened (False when the model already runs it, or cannot switch).
    """
    before = attention_implementation(model)
    setter = getattr(model, "set_attn_implementation", None)
    switched = False
    if before not in (None, implementation) and callable(setter):
        try:
            setter(implementation)
            switched = True
        except (ValueError, ImportError, AttributeError):
            switched = False
    try:
        yield switched
    finally:
        if switched and callable(setter):
            setter(before)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A custom attention mask ``[B, 1, N, N]`` from a boolean ``[B, N, N]`` (True = may attend).

    transformers takes a 4-D mask as already prepared and uses it as it is: additive, in the model's dtype.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def drop_quantizer(model: nn.Module) -> None:
    """Forget that the model was loaded from quantised weights (after dequantising), so it saves as plain weights."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None  # type: ignore[assignment]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


__all__ = [
    "CACHE_KEYWORDS",
    "accepts_logits_to_keep",
    "additive_mask",
    "append_kv",
    "attention_implementation",
    "cache_keyword",
    "cache_kwargs",
    "cache_layers",
    "drop_quantizer",
    "find_cache",
    "is_cache",
    "layer_kv",
    "logits_to_keep_kwargs",
    "new_cache",
    "output_cache",
    "set_layer_kv",
    "transformers_version",
    "using_attention",
]
