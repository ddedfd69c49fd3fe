"""Named inspection setups from the Patchscopes paper, as Patchscope configurations.

>>> ENTITY_DESCRIPTION.scope("Diana, Princess of Wales", layer=4).target.layer
'same'
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchscopes.layers import LayerSpec
from patchscopes.positions import Placeholder, PositionSpec
from patchscopes.scope import SAME, DecodeAt, Decoding, Generate, NextToken, Patchscope, Source, Target

TOKEN_IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ENTITY_DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean multinational "
    "major appliance and consumer electronics corporation, x"
)


@dataclass(frozen=True)
class Preset:
    """A target prompt, position, layer rule and decoding that together define an inspection."""

    name: str
    target_prompt: str | None
    target_position: PositionSpec | str
    target_layer: LayerSpec
    decoding: Decoding
    description: str = ""
    decode_at: DecodeAt = "end"

    def scope(
        self,
        prompt: str,
        layer: LayerSpec,
        position: PositionSpec = -1,
        target_layer: LayerSpec | None = None,
        decoding: Decoding | None = None,
        mapping: object = None,
    ) -> Patchscope:
        """The Patchscope inspecting ``prompt`` at ``layer`` and ``position`` with this preset."""
        return Patchscope(
            source=Source(prompt, layer=layer, position=position),
            target=Target(
                self.target_prompt,
                layer=self.target_layer if target_layer is None else target_layer,
                position=self.target_position,
                decode_at=self.decode_at,
            ),
            mapping=mapping,
            decoding=decoding or self.decoding,
        )

    def with_decoding(self, decoding: Decoding) -> Preset:
        return replace(self, decoding=decoding)


LOGIT_LENS = Preset(
    "logit-lens",
    target_prompt=None,
    target_position=SAME,
    target_layer=-1,
    decoding=NextToken(),
    description="T = S, ℓ* = L−1, i* = i: the hidden state goes straight to the final norm and unembedding",
    decode_at="patch",
)
TOKEN_IDENTITY = Preset(
    "token-identity",
    target_prompt=TOKEN_IDENTITY_PROMPT,
    target_position=Placeholder("?"),
    target_layer=SAME,
    decoding=NextToken(),
    description="few-shot identity prompt; the patched '?' should decode to the token the state encodes",
)
ENTITY_DESCRIPTION = Preset(
    "entity-description",
    target_prompt=ENTITY_DESCRIPTION_PROMPT,
    target_position=Placeholder("x"),
    target_layer=SAME,
    decoding=Generate(max_new_tokens=20),
    description="the paper's few-shot description prompt; the patched 'x' is described",
)


def attribute(prompt: str, placeholder: str = "x", max_new_tokens: int = 20) -> Preset:
    """Attribute extraction: a relation verbalisation with a placeholder, e.g. ``"The official currency of x"``."""
    return Preset(
        f"attribute:{prompt}",
        target_prompt=prompt,
        target_position=Placeholder(placeholder),
        target_layer=SAME,
        decoding=Generate(max_new_tokens=max_new_tokens),
        description="attribute extraction by a relation prompt with a placeholder",
    )


def custom(prompt: str, placeholder: str = "x", decoding: Decoding | None = None) -> Preset:
    """Any target prompt with a placeholder, generating 20 tokens by default."""
    return Preset(
        "custom",
        target_prompt=prompt,
        target_position=Placeholder(placeholder),
        target_layer=SAME,
        decoding=decoding or Generate(max_new_tokens=20),
    )


PRESETS: dict[str, Preset] = {p.name: p for p in (LOGIT_LENS, TOKEN_IDENTITY, ENTITY_DESCRIPTION)}
