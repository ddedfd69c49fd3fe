"""Named inspection setups from the Patchscopes paper, as Patchscope configurations.

>>> ENTITY_DESCRIPTION.scope("Diana, Princess of Wales", layer=4).target.layer
'same'

Every preset's target prompt is sent as written; ``preset.with_chat(True)`` (or ``"auto"``) wraps it as a user
turn with the model's chat template instead (see :mod:`patchscopes.chat`):

>>> ENTITY_DESCRIPTION.with_chat(True).scope("Diana", layer=4).target.chat
True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchscopes.chat import ChatOption, check_chat
from patchscopes.errors import SpecError
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
    """A target prompt, position, layer rule and decoding that together define an inspection.

    ``chat`` is the target's chat-template option (:class:`~patchscopes.scope.Target`): ``False`` sends the
    prompt as written, ``True`` wraps it as a user turn, ``"auto"`` wraps it when the tokenizer has a template.
    """

    name: str
    target_prompt: str | None
    target_position: PositionSpec | str
    target_layer: LayerSpec
    decoding: Decoding
    description: str = ""
    decode_at: DecodeAt = "end"
    chat: ChatOption = False

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
                chat=self.chat,
            ),
            mapping=mapping,
            decoding=decoding or self.decoding,
        )

    def with_decoding(self, decoding: Decoding) -> Preset:
        """This preset with another decoding."""
        return replace(self, decoding=decoding)

    def with_chat(self, chat: ChatOption) -> Preset:
        """This preset with another chat-template option; one without a target prompt of its own (the logit
        lens reads the source prompt at the source's positions) keeps the raw prompt, except that ``True``
        is refused."""
        chat = check_chat(chat)
        if self.target_prompt is None:
            if chat is True:
                raise SpecError(
                    f"preset {self.name!r} has no target prompt of its own to wrap with a chat template; pass chat=False"
                )
            return self
        return replace(self, chat=chat)


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


def attribute(prompt: str, placeholder: str = "x", max_new_tokens: int = 20, chat: ChatOption = False) -> Preset:
    """Attribute extraction: a relation verbalisation with a placeholder, e.g. ``"The official currency of x"``."""
    return Preset(
        f"attribute:{prompt}",
        target_prompt=prompt,
        target_position=Placeholder(placeholder),
        target_layer=SAME,
        decoding=Generate(max_new_tokens=max_new_tokens),
        description="attribute extraction by a relation prompt with a placeholder",
        chat=check_chat(chat),
    )


def custom(prompt: str, placeholder: str = "x", decoding: Decoding | None = None, chat: ChatOption = False) -> Preset:
    """Any target prompt with a placeholder, generating 20 tokens by default (``chat``: see :class:`Preset`)."""
    return Preset(
        "custom",
        target_prompt=prompt,
        target_position=Placeholder(placeholder),
        target_layer=SAME,
        decoding=decoding or Generate(max_new_tokens=20),
        chat=check_chat(chat),
    )


PRESETS: dict[str, Preset] = {p.name: p for p in (LOGIT_LENS, TOKEN_IDENTITY, ENTITY_DESCRIPTION)}
