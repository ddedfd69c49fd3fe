"""Chat templates for target prompts: the one place that decides what text the target model reads.

A target's ``chat`` option says whether its prompt is sent as written (``False``, the default), wrapped as
one user turn with the tokenizer's chat template and the assistant's generation prompt (``True``), or
wrapped only when the tokenizer ships a template (``"auto"``).

Positions are resolved on the templated tokens: an int counts in the templated prompt (``-1`` is the last
token of the generation prompt), while a :class:`~patchscopes.positions.Placeholder` or
:class:`~patchscopes.positions.Substring` is looked for in the caller's own text only (never in the
template's system prompt), and its occurrences are counted there. The templated text already holds any
BOS token the template writes, so it is tokenised without the tokenizer's special tokens.

>>> resolve_chat(False, has_template=True)
False
>>> resolve_chat("auto", has_template=False)
False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from patchscopes.errors import ChatTemplateError, OptionError, PositionError, SpecError
from patchscopes.positions import Placeholder, PositionSpec, Substring, resolve_positions

if TYPE_CHECKING:
    from patchscopes.models.loading import ModelHandle

ChatOption = Union[bool, Literal["auto"]]
"""``False`` (raw prompt), ``True`` (always templated) or ``"auto"`` (templated when the tokenizer has a template)."""

CHAT_VALUES = ("auto", "true", "false")


def check_chat(chat: object) -> ChatOption:
    """``chat`` itself when it is ``True``, ``False`` or ``"auto"``; else :class:`SpecError`."""
    if chat is True or chat is False or chat == "auto":
        return chat  # type: ignore[return-value]
    raise SpecError(f"chat must be True, False or 'auto', not {chat!r}")


def parse_chat(text: str) -> ChatOption:
    """The command line's ``--chat`` value: ``auto``, ``true``/``on``/``yes`` or ``false``/``off``/``no``."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("true", "on", "yes", "1"):
        return True
    if value in ("false", "off", "no", "0"):
        return False
    raise OptionError(f"--chat takes auto, true or false, not {text!r}")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` ships a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat(chat: ChatOption, has_template: bool, model_name: str = "the model") -> bool:
    """Whether to template: ``"auto"`` follows ``has_template``; ``True`` without a template is an error."""
    chat = check_chat(chat)
    if chat == "auto":
        return has_template
    if chat and not has_template:
        raise ChatTemplateError(
            f"chat=True, but the tokenizer of {model_name} has no chat template to wrap the target prompt with; "
            "pass chat=False (--chat false) for the raw prompt, chat='auto' to template only where a template exists, "
            "or set tokenizer.chat_template to a Jinja template"
        )
    return bool(chat)


def chat_text(lm: ModelHandle, prompt: str) -> str:
    """``prompt`` as one user turn with ``lm``'s chat template, ending in the assistant's generation prompt."""
    resolve_chat(True, has_chat_template(lm.tokenizer), lm.name)
    try:
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template is user-supplied Jinja: any error it raises is a template error
        raise ChatTemplateError(
            f"the chat template of {lm.name} failed on the target prompt {prompt!r} ({type(exc).__name__}: {exc}); "
            "fix tokenizer.chat_template or pass chat=False"
        ) from exc
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"the chat template of {lm.name} returned {type(text).__name__}, not text; fix tokenizer.chat_template"
        )
    return text


@dataclass(frozen=True)
class TargetText:
    """What the target model reads: its text, token ids and character offsets, and where the caller's prompt
    lies in it (``start``; 0 for a raw prompt). ``chat`` says whether it was templated."""

    prompt: str
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    start: int
    chat: bool

    def resolve(self, spec: PositionSpec) -> list[int]:
        """Token indices of ``spec`` in the templated ids (a placeholder or substring is found in the prompt)."""
        if not self.chat or not isinstance(spec, (Placeholder, Substring)):
            return resolve_positions(spec, self.text, self.offsets)
        end = self.start + len(self.prompt)
        inside = [(max(s, self.start) - self.start, min(e, end) - self.start) for s, e in self.offsets]
        # a token outside the prompt becomes empty (skipped); one that straddles its edge keeps the inner part
        inside = [(s, e) if e > s else (0, 0) for s, e in inside]
        positions = resolve_positions(spec, self.prompt, inside)
        if isinstance(spec, Placeholder):
            for i in positions:
                s, e = self.offsets[i]
                if self.text[s : self.start].strip() or self.text[end:e].strip():
                    raise PositionError(
                        f"placeholder {spec.text!r} shares a token with the chat template's own text "
                        f"({self.text[s:e]!r}); put a space or newline around it, or pass chat=False"
                    )
        return positions


def target_text(lm: ModelHandle, prompt: str, chat: ChatOption = False) -> TargetText:
    """The text, ids and offsets the target model reads for ``prompt`` under the ``chat`` option."""
    if not resolve_chat(chat, has_chat_template(lm.tokenizer), lm.name):
        tok = lm.tokenize(prompt)
        return TargetText(prompt, prompt, tok.ids, tok.offsets, 0, False)
    lm.tokenize(prompt)  # the same empty-prompt check as a raw target
    text = chat_text(lm, prompt)
    start = text.rfind(prompt)
    if start < 0:
        raise ChatTemplateError(
            f"the chat template of {lm.name} does not keep the target prompt {prompt!r} verbatim, so its positions "
            "cannot be found in the templated text; pass chat=False or use a template that inserts the message as is"
        )
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return TargetText(prompt, text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], start, True)


__all__ = [
    "CHAT_VALUES",
    "ChatOption",
    "TargetText",
    "chat_text",
    "check_chat",
    "has_chat_template",
    "parse_chat",
    "resolve_chat",
    "target_text",
]
