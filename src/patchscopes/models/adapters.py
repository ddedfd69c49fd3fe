"""The one description of where a causal LM keeps its blocks, token embedding, final norm and unembedding.

Most models need no entry: :func:`discover_spec` reads the layout from the module tree through public
APIs (``get_input_embeddings``, ``get_output_embeddings``, the decoder's ``ModuleList`` of blocks, the
norm registered after it). :data:`ARCHITECTURES` lists only the families discovery gets wrong, and a user
can always pass the paths by hand::

    >>> from patchscopes.models.adapters import ArchSpec
    >>> spec = ArchSpec(blocks="model.layers", final_norm="model.norm",
    ...                 unembed="lm_head", embed="model.embed_tokens")
    >>> spec.blocks
    'model.layers'

Whatever the source, :mod:`patchscopes.models.probes` checks the result when the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchscopes.errors import UnknownArchitectureError


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps its attention output projection, its two input norms and its MLP (edge attribution).

    Edge attribution needs attention and MLP outputs that add straight into the residual stream, with one
    norm in front of each (the Llama and GPT-2 layout); a block with norms after its sublayers has none.
    """

    o_proj: str
    attn_norm: str
    mlp_norm: str
    mlp: str
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out]


LLAMA_BLOCK = BlockLayout("self_attn.o_proj", "input_layernorm", "post_attention_layernorm", "mlp")
GPT2_BLOCK = BlockLayout("attn.c_proj", "ln_1", "ln_2", "mlp", conv1d=True)


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths inside a causal LM (relative to the ``*ForCausalLM`` object).

    A path may list alternatives separated by ``|`` (tried in order), for names that changed across
    transformers versions. ``block_layout`` is set where edge attribution can run on the blocks.
    """

    blocks: str
    final_norm: str | None
    unembed: str
    embed: str
    block_layout: BlockLayout | None = None


#: model_type -> module paths, for the families whose layout discovery cannot read (or reads wrongly).
#: Every other model type is discovered; the coverage page (docs/architectures.md) lists what passes.
ARCHITECTURES: dict[str, ArchSpec] = {}

#: Children of a block whose presence means norms sit after the sublayers (Gemma 2/3, OLMo 2 style).
_POST_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm")


def module_at(model: nn.Module, path: str) -> nn.Module:
    """Module at a dotted path; ``a|b`` lists alternatives tried in order (names differ across versions)."""
    if "|" in path:
        for alternative in path.split("|"):
            if _has(model, alternative):
                return module_at(model, alternative)
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


def _has(model: nn.Module, path: str) -> bool:
    if "|" in path:
        return any(_has(model, alternative) for alternative in path.split("|"))
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def text_config(model: nn.Module) -> object:
    """The language model's config (``config.text_config`` of multimodal wrappers, else ``config``)."""
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except TypeError:  # pragma: no cover - older signatures
            pass
    return getattr(config, "text_config", None) or config


class Adapter:
    """The modules of one loaded model, found through an :class:`ArchSpec`."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.spec = spec
        blocks = module_at(model, spec.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise UnknownArchitectureError(f"{spec.blocks!r} is a {type(blocks).__name__}, expected a ModuleList of blocks")
        self.blocks: nn.ModuleList = blocks
        self.final_norm: nn.Module | None = None
        if spec.final_norm is not None:
            norm = module_at(model, spec.final_norm) if _has(model, spec.final_norm) else None
            self.final_norm = norm
        self.unembed: nn.Module = module_at(model, spec.unembed)
        self.embed: nn.Module = module_at(model, spec.embed)
        config = text_config(model)
        self._config = config
        self.softcap: float | None = _first_number(config, LOGIT_SOFTCAP_KEYS)
        self.logit_multiplier: float = _logit_multiplier(model, config)
        self.block_layout: BlockLayout | None = spec.block_layout

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (the config's ``hidden_size``, else the unembedding's input size)."""
        size = getattr(self._config, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
        for module in (self.unembed, *self.unembed.modules()):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return int(weight.shape[-1])
        raise UnknownArchitectureError("cannot read the hidden size from the config or the unembedding weight")

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding, logit scaling and soft-capping where the model has them: block output → logits."""
        h = hidden
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.unembed(h)
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


#: Config keys of the soft cap a model applies to its logits, ``tanh(logits / cap) * cap`` (Gemma 2/3,
#: RecurrentGemma, xLSTM).
LOGIT_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
#: Config keys of a constant the logits (or, equivalently, the normed state before the linear head) are divided
#: by (Granite's ``logits_scaling``, the μP width multiplier of Inkling).
LOGIT_DIVISOR_KEYS = ("logits_scaling", "logits_mup_width_multiplier")


def _first_number(config: object, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        try:
            value = getattr(config, key, None)
        except Exception:  # per-layer attributes raise on global access
            value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            return float(value)
    return None


def _logit_multiplier(model: nn.Module, config: object) -> float:
    """The constant a model multiplies its logits by after the head (Cohere's ``logit_scale``, the divisors above)."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    divisor = _first_number(config, LOGIT_DIVISOR_KEYS)
    return 1.0 / divisor if divisor else 1.0


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def discover_spec(model: nn.Module) -> ArchSpec:
    """Read a causal LM's layout from its module tree; raise :class:`UnknownArchitectureError` where it is unclear.

    - the token embedding and unembedding are what ``get_input_embeddings`` / ``get_output_embeddings`` return;
    - the blocks are the ``ModuleList`` with ``num_hidden_layers`` entries nearest the embedding (a vision
      tower's blocks sit elsewhere);
    - the final norm is the last norm registered beside the blocks, after them.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    getters = [getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)]
    found: list[nn.Module | None] = []
    for get in getters:
        try:
            found.append(get() if callable(get) else None)
        except (NotImplementedError, AttributeError):
            found.append(None)
    embed, unembed = _path_of(model, found[0]), _path_of(model, found[1])
    if embed is None or unembed is None:
        raise UnknownArchitectureError(
            f"{type(model).__name__} ({model_type!r}) does not expose its token embedding and unembedding through "
            "get_input_embeddings() / get_output_embeddings(); pass adapter=ArchSpec(...) with the paths"
        )
    n_layers = getattr(text_config(model), "num_hidden_layers", None) or getattr(text_config(model), "n_layer", None)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not lists:  # a decoder whose depth the config names otherwise (decoder_layers, …): the list nearest the embedding
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise UnknownArchitectureError(
            f"{type(model).__name__} ({model_type!r}) has no ModuleList of {n_layers} blocks; "
            "pass adapter=ArchSpec(blocks=..., ...) with the path of its decoder layers"
        )
    blocks, block_list = max(lists, key=lambda item: (_common_prefix(item[0], embed), -item[0].count(".")))
    norms = norm_candidates(model, blocks)
    layout = _block_layout(block_list[0])
    return ArchSpec(blocks=blocks, final_norm=norms[0] if norms else None, unembed=unembed, embed=embed, block_layout=layout)


def norm_candidates(model: nn.Module, blocks: str) -> list[str]:
    """Paths of the norms that may be the final one, most likely first.

    Beside the blocks and registered after them; then beside them before (OPT registers its final norm
    first); then the same one level up, and so on to the model itself (RoBERTa-PreLayerNorm's final norm sits
    on the base model, beside the encoder that holds the blocks).
    """
    found: list[str] = []
    path = blocks
    while path:
        path, _, child_name = path.rpartition(".")
        parent = module_at(model, path) if path else model
        after: list[str] = []
        before: list[str] = []
        seen = False
        for name, child in parent.named_children():
            full = f"{path}.{name}" if path else name
            if name == child_name:
                seen = True
            elif _is_norm(child):
                (after if seen else before).append(full)
        found += [p for p in after[::-1] + before[::-1] if p not in found]
    return found


def unembed_candidates(model: nn.Module, unembed: str) -> list[str]:
    """The output embedding, then the heads around it (BERT-style heads transform the state before the decoder)."""
    out = [unembed]
    path = unembed
    while "." in path:
        path = path.rpartition(".")[0]
        out.append(path)
    return out


def _block_layout(block: nn.Module) -> BlockLayout | None:
    """The Llama or GPT-2 block layout when the block has exactly it (norms before the sublayers only), else None."""
    if any(hasattr(block, name) for name in _POST_NORMS):
        return None
    for layout in (LLAMA_BLOCK, GPT2_BLOCK):
        if all(_has(block, path) for path in (layout.o_proj, layout.attn_norm, layout.mlp_norm, layout.mlp)):
            o_proj = module_at(block, layout.o_proj)
            kind = type(o_proj).__name__
            if (layout.conv1d and kind == "Conv1D") or (not layout.conv1d and isinstance(o_proj, nn.Linear)):
                return layout
    return None


def spec_for(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a Hugging Face model: its explicit entry by ``config.model_type``, else discovered."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[str(model_type)]
    return discover_spec(model)
