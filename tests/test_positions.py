"""Text → token positions through character offsets, on the tiny BPE and on every installed registry tokenizer."""

from __future__ import annotations

import pytest

from patchscopes.errors import PositionError, SpecError
from patchscopes.models.registry import REGISTRY
from patchscopes.positions import (
    Placeholder,
    Substring,
    char_span_to_tokens,
    position_from_json,
    position_to_json,
    resolve_positions,
)

PROMPTS = [
    ("Diana, Princess of Wales", "Diana"),
    ("Diana, Princess of Wales", "Princess of Wales"),
    ("The official currency of the United States is the dollar", "United States"),
    ("Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x", "DiCaprio"),
    ("naïve café in Brasília, 1135 km away", "Brasília"),
]


def test_char_span_to_tokens_overlap():
    offsets = [(0, 0), (0, 5), (5, 6), (6, 15), (15, 18), (18, 24)]  # a BOS with an empty span first
    assert char_span_to_tokens(offsets, 0, 5) == [1]
    assert char_span_to_tokens(offsets, 7, 24) == [3, 4, 5]
    assert char_span_to_tokens(offsets, 24, 30) == []


def test_int_and_list_positions():
    offsets = [(0, 1), (1, 2), (2, 3)]
    assert resolve_positions(-1, "abc", offsets) == [2]
    assert resolve_positions([0, -1], "abc", offsets) == [0, 2]
    with pytest.raises(PositionError, match="outside the prompt"):
        resolve_positions(3, "abc", offsets)
    with pytest.raises(PositionError, match="valid: -3..2"):
        resolve_positions(-4, "abc", offsets)
    with pytest.raises(SpecError):
        resolve_positions([], "abc", offsets)


def test_placeholder_is_whole_word(smol):
    prompt = "Mexico: country, x"
    tok = smol.tokenize(prompt)
    [p] = resolve_positions(Placeholder("x"), prompt, tok.offsets)
    assert p == len(tok) - 1  # the 'x' of "Mexico" is not a placeholder
    with pytest.raises(PositionError, match="placeholder 'y' not found"):
        resolve_positions(Placeholder("y"), prompt, tok.offsets)
    with pytest.raises(PositionError, match="occurs 1 time"):
        resolve_positions(Placeholder("x", occurrence=1), prompt, tok.offsets)


def test_json_round_trip():
    for spec in (3, -1, [1, 2], Substring("Diana", tokens="all"), Placeholder("?")):
        assert position_from_json(position_to_json(spec)) == spec


def _check_tokenizer(lm):
    for prompt, sub in PROMPTS:
        tok = lm.tokenize(prompt)
        start = prompt.rfind(sub)
        end = start + len(sub)
        [last] = resolve_positions(Substring(sub), prompt, tok.offsets)
        [first] = resolve_positions(Substring(sub, tokens="first"), prompt, tok.offsets)
        every = resolve_positions(Substring(sub, tokens="all"), prompt, tok.offsets)
        # the last token ends at or after the substring's end and starts inside it
        s, e = tok.offsets[last]
        assert e >= end and s < end, (lm.name, prompt, sub, tok.offsets[last])
        assert every[0] == first and every[-1] == last and every == list(range(first, last + 1))
        # decoding the covering tokens gives back the substring (up to surrounding spaces)
        decoded = lm.tokenizer.decode([tok.ids[i] for i in every]).strip()
        assert sub in decoded, (lm.name, sub, decoded)


def test_substring_tiny_tokenizer(tiny):
    _check_tokenizer(tiny)


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "Qwen2.5-Coder-1.5B"])
def test_substring_registry_tokenizers(name, smol):
    from patchscopes import load_model

    entry = REGISTRY[name]
    if not entry.is_installed():
        pytest.skip(f"{name} is not installed: `patchscopes models install {name}`")
    lm = smol if name == smol.name else load_model(name)
    _check_tokenizer(lm)
