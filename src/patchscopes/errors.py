"""Project exceptions: each message names the bad value and what would be valid."""

from __future__ import annotations


class PatchscopeError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownModelError(PatchscopeError, ValueError):
    """A model name is neither a registry name, a local directory nor a loadable hub id."""


class ModelNotInstalledError(PatchscopeError, RuntimeError):
    """A registry model whose weight package is not installed."""


class CacheError(PatchscopeError, RuntimeError):
    """A converted-weights cache could not be built or verified."""


class UnknownArchitectureError(PatchscopeError, ValueError):
    """No adapter knows where this architecture keeps its blocks, norm and unembedding."""


class OptionError(PatchscopeError, ValueError):
    """An option value that is not valid (a device, a dtype, …)."""


class LayerError(PatchscopeError, IndexError):
    """A layer index outside the model's blocks."""


class PositionError(PatchscopeError, IndexError):
    """A token position outside the prompt, or a substring/placeholder that is not there."""


class PromptError(PatchscopeError, ValueError):
    """An empty or otherwise unusable prompt."""


class MappingError(PatchscopeError, ValueError):
    """A mapping whose shapes, provenance or serialisation do not fit its use."""


class MapProvenanceError(MappingError):
    """A saved map, lens, LRE or concept set used with models, weights or layers other than the ones it was fitted for."""


class SpecError(PatchscopeError, ValueError):
    """An invalid Patchscope specification (bad option, unserialisable part, …)."""


class ChatTemplateError(PatchscopeError, ValueError):
    """A target asked for a chat template that the tokenizer lacks, or whose template cannot wrap the prompt."""


class EngineError(PatchscopeError, RuntimeError):
    """The requested engine cannot run this model or these Patchscopes exactly."""


class ModelCheckError(PatchscopeError, RuntimeError):
    """A loaded model failed a load-time probe: the library cannot read or write its hidden states exactly."""


class PatchscopesWarning(UserWarning):
    """The library fell back to a slower exact path, or did something the caller should know about."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as one :class:`PatchscopesWarning`, once per ``key`` in this process."""
    import warnings

    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, PatchscopesWarning, stacklevel=3)
