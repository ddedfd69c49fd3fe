"""Where each architecture keeps its blocks, final norm, unembedding and token embedding.

The table is declarative: one row per Hugging Face ``model_type``. An unknown architecture raises
:class:`UnknownArchitectureError` with instructions to pass an :class:`ArchSpec` yourself::

    >>> from patchscopes.models.adapters import ArchSpec
    >>> spec = ArchSpec(blocks="model.layers", final_norm="model.norm",
    ...                 unembed="lm_head", embed="model.embed_tokens")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchscopes.errors import UnknownArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths inside a causal LM (relative to the ``*ForCausalLM`` object).

    A path may list alternatives separated by ``|`` (tried in order), for names that changed across
    transformers versions.
    """

    blocks: str
    final_norm: str | None
    unembed: str
    embed: str


_DECODER = ArchSpec(blocks="model.layers", final_norm="model.norm", unembed="lm_head", embed="model.embed_tokens")
_GPT2 = ArchSpec(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte")

#: model_type -> module paths. Families sharing the Llama layout are listed explicitly, so that an
#: architecture nobody checked fails loudly instead of being guessed.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "mixtral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "gemma3": ArchSpec(
        blocks="model.language_model.layers",
        final_norm="model.language_model.norm",
        unembed="lm_head",
        embed="model.language_model.embed_tokens",
    ),
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "phi": ArchSpec(blocks="model.layers", final_norm="model.final_layernorm", unembed="lm_head", embed="model.embed_tokens"),
    "gpt2": _GPT2,
    "gptj": _GPT2,
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", unembed="embed_out|lm_head", embed="gpt_neox.embed_in"
    ),
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
    ),
    "bloom": ArchSpec(
        blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.word_embeddings"
    ),
    "falcon": ArchSpec(
        blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.word_embeddings"
    ),
}


def _get(model: nn.Module, path: str) -> nn.Module:
    """Module at a dotted path; ``a|b`` lists alternatives tried in order (names differ across versions)."""
    if "|" in path:
        for alternative in path.split("|"):
            if _has(model, alternative):
                return _get(model, alternative)
        path = path.split("|")[0]
    obj: object = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnknownArchitectureError(
                f"module path {path!r} does not exist in {type(model).__name__} (missing {part!r}); "
                "pass adapter=ArchSpec(blocks=..., final_norm=..., unembed=..., embed=...) with the right paths"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise UnknownArchitectureError(f"{path!r} in {type(model).__name__} is not a module")
    return obj


class Adapter:
    """The modules of one loaded model, found through an :class:`ArchSpec`."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.spec = spec
        blocks = _get(model, spec.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise UnknownArchitectureError(f"{spec.blocks!r} is a {type(blocks).__name__}, expected a ModuleList of blocks")
        self.blocks: nn.ModuleList = blocks
        self.final_norm: nn.Module | None = None
        if spec.final_norm is not None:
            norm = _get(model, spec.final_norm) if _has(model, spec.final_norm) else None
            self.final_norm = norm
        self.unembed: nn.Module = _get(model, spec.unembed)
        self.embed: nn.Module = _get(model, spec.embed)
        config = getattr(model, "config", None)
        text_config = getattr(config, "text_config", None) or config
        self.softcap: float | None = getattr(text_config, "final_logit_softcapping", None)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        weight = getattr(self.unembed, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[-1])
        raise UnknownArchitectureError("cannot read the hidden size from the unembedding weight")

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding (and logit soft-capping where the model has it): block output → logits."""
        h = hidden
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.unembed(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _has(model: nn.Module, path: str) -> bool:
    if "|" in path:
        return any(_has(model, alternative) for alternative in path.split("|"))
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def spec_for(model: nn.Module) -> ArchSpec:
    """Look up the :class:`ArchSpec` of a Hugging Face model by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[str(model_type)]
    known = ", ".join(sorted(ARCHITECTURES))
    raise UnknownArchitectureError(
        f"architecture {model_type!r} ({type(model).__name__}) is not in the adapter table (known: {known}). "
        "Pass the module paths yourself: load_model(..., adapter=ArchSpec(blocks='model.layers', "
        "final_norm='model.norm', unembed='lm_head', embed='model.embed_tokens')) with your model's names "
        "(print(model) shows them)."
    )
