"""Bridges from LREs and concepts to Patchscopes.

- :func:`attribute_lens_scope`: a Patchscope whose mapping is the LRE: the subject state at ``ℓ_s`` is mapped
  to ``W s + b`` and written at ``ℓ_o`` over the last prompt token, then the next token is read — the
  "attribute lens" of Hernandez et al. in the Patchscope vocabulary.
- :func:`describe_concept`: a concept direction, scaled to a typical subject-state norm, patched into an
  inspection prompt (token identity or entity description) to say in words what it encodes.

    >>> scope = attribute_lens_scope(lre, "The sentiment of 'joy' is", "joy")    # doctest: +SKIP
    >>> run(scope, lm).top_tokens[:3]                                            # doctest: +SKIP
    >>> describe_concept(lm, concepts, "positive").text                         # doctest: +SKIP
"""

from __future__ import annotations

import torch

from patchscopes.models.loading import ModelHandle
from patchscopes.patching import Patch, PatchedRun, run_patched
from patchscopes.positions import Substring, resolve_positions
from patchscopes.presets import TOKEN_IDENTITY, Preset
from patchscopes.relations.lrc import ConceptSet
from patchscopes.relations.lre import LinearRelationalEmbedding
from patchscopes.scope import Generate, NextToken, Patchscope, Source, Target


def attribute_lens_scope(lre: LinearRelationalEmbedding, prompt: str, subject: str, top_k: int = 10) -> Patchscope:
    """The Patchscope that decodes ``W s + b`` (subject's last token at ``ℓ_s``) from ``ℓ_o`` of the same prompt."""
    return Patchscope(
        source=Source(prompt, layer=lre.subject_layer, position=Substring(subject)),
        target=Target(None, layer=lre.object_layer, position=-1),
        mapping=lre.as_mapping(),
        decoding=NextToken(top_k=top_k),
    )


class ConceptDescription:
    """What an inspection prompt says about one concept direction."""

    def __init__(self, name: str, top_tokens: list[str], top_probs: list[float], text: str) -> None:
        self.name, self.top_tokens, self.top_probs, self.text = name, top_tokens, top_probs, text

    def __repr__(self) -> str:
        return f"ConceptDescription({self.name!r}, top={self.top_tokens[:5]}, text={self.text!r})"


def describe_concept(
    lm: ModelHandle,
    concepts: ConceptSet,
    name: str,
    preset: Preset = TOKEN_IDENTITY,
    scale: float | None = None,
    layer: int | None = None,
    max_new_tokens: int = 8,
    top_k: int = 10,
) -> ConceptDescription:
    """Patch ``scale · v`` (default scale: the concepts' recorded mean subject-state norm) into ``preset``'s prompt.

    The vector is written at the concepts' subject layer (or ``layer``) over the preset's placeholder.
    """
    if preset.target_prompt is None:
        raise ValueError(f"preset {preset.name!r} has no inspection prompt; use TOKEN_IDENTITY or ENTITY_DESCRIPTION")
    target_layer = int(layer if layer is not None else concepts.metadata["subject_layer"])
    norm = float(scale if scale is not None else concepts.metadata.get("subject_norm", 1.0))
    tok = lm.tokenize(preset.target_prompt)
    positions = resolve_positions(preset.target_position, preset.target_prompt, tok.offsets)  # type: ignore[arg-type]
    vector = (concepts.vector(name) * norm)[None].repeat(len(positions), 1)
    decoding = preset.decoding
    new_tokens = max_new_tokens if isinstance(decoding, Generate) else 0
    [out] = run_patched(lm, [PatchedRun(tok.ids, [Patch(target_layer, positions, vector)])], max_new_tokens=new_tokens)
    probs = torch.softmax(out.logits, dim=-1)
    top = probs.topk(top_k)
    text = lm.tokenizer.decode(out.generated) if out.generated else lm.tokenizer.decode([int(top.indices[0])])
    return ConceptDescription(name, lm.token_strings(top.indices.tolist()), [float(p) for p in top.values], text)
