"""Text → token positions, through the tokenizer's character offsets.

A position always refers to the unpadded prompt (special tokens the tokenizer adds included). It may be
an int (negative counts from the end), a list of ints, a :class:`Substring` (tokens covering a piece of
text) or a :class:`Placeholder` (a whole-word marker such as ``x`` in an inspection prompt)::

    >>> Substring("Diana")            # last token of the last occurrence of "Diana"
    Substring(text='Diana', occurrence=-1, tokens='last')
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

from patchscopes.errors import PositionError, SpecError

TokenChoice = Literal["last", "first", "all"]


@dataclass(frozen=True)
class Substring:
    """Tokens overlapping an occurrence of ``text`` in the prompt (``occurrence`` -1 = the last one)."""

    text: str
    occurrence: int = -1
    tokens: TokenChoice = "last"


@dataclass(frozen=True)
class Placeholder:
    """A delimited placeholder (default ``x``) in an inspection prompt; same choices as :class:`Substring`.

    It matches only where it stands apart: not inside a word, and not joined to one by ``-`` or ``_``
    (so the ``x`` of "x-ray" is not a placeholder); and the match must be whole tokens. A placeholder that
    shares a token with its neighbours is an error that shows the tokens.
    """

    text: str = "x"
    occurrence: int = -1
    tokens: TokenChoice = "last"


PositionSpec = Union[int, list[int], tuple[int, ...], Substring, Placeholder]


def find_spans(prompt: str, text: str, whole_word: bool) -> list[tuple[int, int]]:
    """Character spans of ``text`` in ``prompt``; with ``whole_word``, only the delimited ones (the placeholder rule)."""
    if not text:
        raise SpecError("a substring or placeholder must not be empty")
    pattern = re.escape(text)
    if whole_word:
        pattern = r"(?<![\w-])" + pattern + r"(?![\w-])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, prompt)]


def char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span overlaps ``[start, end)`` (zero-width tokens skipped)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def resolve_positions(spec: PositionSpec, prompt: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Resolve a position spec into non-negative token indices of the unpadded prompt."""
    n = len(offsets)
    if isinstance(spec, bool):
        raise SpecError(f"position must be an int, a list of ints, Substring or Placeholder, not {spec!r}")
    if isinstance(spec, int):
        return [_check_index(spec, n, prompt)]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SpecError("an empty list of positions patches nothing; give at least one position")
        return [_check_index(int(p), n, prompt) for p in spec]
    if isinstance(spec, (Substring, Placeholder)):
        whole_word = isinstance(spec, Placeholder)
        spans = find_spans(prompt, spec.text, whole_word)
        kind = "placeholder" if whole_word else "substring"
        if not spans:
            hint = " (as a whole word)" if whole_word else ""
            raise PositionError(
                f"{kind} {spec.text!r} not found{hint} in prompt {prompt!r}; add it to the prompt or pass an int position"
            )
        try:
            start, end = spans[spec.occurrence]
        except IndexError:
            raise PositionError(
                f"{kind} {spec.text!r} occurs {len(spans)} time(s) in {prompt!r}; occurrence {spec.occurrence} is out of range"
            ) from None
        tokens = char_span_to_tokens(offsets, start, end)
        if not tokens:
            raise PositionError(f"no token covers {kind} {spec.text!r} in {prompt!r}")
        if whole_word:
            _check_whole_tokens(spec.text, prompt, offsets, tokens, start, end)
        if spec.tokens == "last":
            return [tokens[-1]]
        if spec.tokens == "first":
            return [tokens[0]]
        return tokens
    raise SpecError(f"position must be an int, a list of ints, Substring or Placeholder, not {type(spec).__name__}")


def _check_whole_tokens(text: str, prompt: str, offsets: list[tuple[int, int]], tokens: list[int], start: int, end: int) -> None:
    """A placeholder's tokens must cover it and nothing but it (a leading space in the first token is fine)."""
    first, last = offsets[tokens[0]], offsets[tokens[-1]]
    before = prompt[first[0] : start]
    after = prompt[end : last[1]]
    if before.strip() or after:
        shown = [prompt[s:e] for s, e in (offsets[i] for i in tokens)]
        raise PositionError(
            f"placeholder {text!r} shares a token with its neighbours in {prompt!r} (tokens {shown}): patching that "
            "token would overwrite more than the placeholder; put a space or newline around it, or pass an int position"
        )


def _check_index(index: int, n: int, prompt: str) -> int:
    if not -n <= index < n:
        raise PositionError(f"position {index} is outside the prompt {prompt!r} of {n} tokens; valid: {-n}..{n - 1}")
    return index % n


def position_to_json(spec: PositionSpec) -> Any:
    if isinstance(spec, Substring):
        return {"substring": asdict(spec)}
    if isinstance(spec, Placeholder):
        return {"placeholder": asdict(spec)}
    if isinstance(spec, (list, tuple)):
        return list(spec)
    return spec


def position_from_json(data: Any) -> PositionSpec:
    if isinstance(data, dict):
        if "substring" in data:
            return Substring(**data["substring"])
        if "placeholder" in data:
            return Placeholder(**data["placeholder"])
        raise SpecError(f"unknown position object {data!r}")
    if isinstance(data, list):
        return [int(p) for p in data]
    return int(data)
