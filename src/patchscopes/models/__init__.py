"""Model loading, the bundled registry, the model layer (layouts, probes) and what runs on each model."""

from patchscopes.models.adapters import ARCHITECTURES, Adapter, ArchSpec, BlockLayout, discover_spec
from patchscopes.models.loading import ModelHandle, Tokenized, from_model, load_model
from patchscopes.models.registry import REGISTRY, RegistryModel

__all__ = [
    "ARCHITECTURES",
    "REGISTRY",
    "Adapter",
    "ArchSpec",
    "BlockLayout",
    "ModelHandle",
    "RegistryModel",
    "Tokenized",
    "discover_spec",
    "from_model",
    "load_model",
]
