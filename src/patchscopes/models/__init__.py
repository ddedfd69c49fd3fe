"""Model loading, the bundled registry and the per-architecture adapter table."""

from patchscopes.models.adapters import ARCHITECTURES, Adapter, ArchSpec
from patchscopes.models.loading import ModelHandle, Tokenized, from_model, load_model
from patchscopes.models.registry import REGISTRY, RegistryModel

__all__ = [
    "ARCHITECTURES",
    "REGISTRY",
    "Adapter",
    "ArchSpec",
    "ModelHandle",
    "RegistryModel",
    "Tokenized",
    "from_model",
    "load_model",
]
