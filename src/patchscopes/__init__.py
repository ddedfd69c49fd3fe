"""patchscopes: ask a language model, in plain text, what its hidden states contain."""

from patchscopes.capture import capture
from patchscopes.errors import (
    CacheError,
    ChatTemplateError,
    EngineError,
    LayerError,
    MappingError,
    ModelCheckError,
    ModelNotInstalledError,
    OptionError,
    PatchscopeError,
    PatchscopesWarning,
    PositionError,
    PromptError,
    SpecError,
    UnknownArchitectureError,
    UnknownModelError,
)
from patchscopes.executors import Executor, PlainExecutor, ReplayExecutor
from patchscopes.layers import EMBEDDINGS
from patchscopes.lenses import AffineLens, Lens, LogitLens
from patchscopes.mappings import AffineFitter, AffineMap, Identity
from patchscopes.models import REGISTRY, ArchSpec, ModelHandle, from_model, load_model
from patchscopes.plan import Plan, compile_plan
from patchscopes.positions import Placeholder, Substring
from patchscopes.presets import ENTITY_DESCRIPTION, LOGIT_LENS, PRESETS, TOKEN_IDENTITY, Preset, attribute, custom
from patchscopes.runner import run, run_many
from patchscopes.scope import Generate, NextToken, Patchscope, PatchscopeResult, Source, Target
from patchscopes.sweep import iter_sweep, sweep

__version__ = "0.1.0"

__all__ = [
    "EMBEDDINGS",
    "ENTITY_DESCRIPTION",
    "LOGIT_LENS",
    "PRESETS",
    "REGISTRY",
    "TOKEN_IDENTITY",
    "AffineFitter",
    "AffineLens",
    "AffineMap",
    "ArchSpec",
    "CacheError",
    "ChatTemplateError",
    "EngineError",
    "Executor",
    "Generate",
    "Identity",
    "LayerError",
    "Lens",
    "LogitLens",
    "MappingError",
    "ModelCheckError",
    "ModelHandle",
    "ModelNotInstalledError",
    "OptionError",
    "NextToken",
    "Patchscope",
    "PatchscopeError",
    "PatchscopesWarning",
    "PatchscopeResult",
    "Plan",
    "PlainExecutor",
    "ReplayExecutor",
    "Placeholder",
    "PositionError",
    "Preset",
    "PromptError",
    "Source",
    "SpecError",
    "Substring",
    "Target",
    "UnknownArchitectureError",
    "UnknownModelError",
    "attribute",
    "capture",
    "compile_plan",
    "custom",
    "iter_sweep",
    "from_model",
    "load_model",
    "run",
    "run_many",
    "sweep",
]
