"""Pair token positions of one text under two tokenizers by the character offset where tokens END.

Two models with the same tokenizer pair identical positions. With different tokenizers a position of
model A is paired with the position of model B whose token ends at the same character: both hidden
states then have read exactly the same prefix of the text. Special tokens (zero-width offsets such as
``<bos>``) never pair. When several tokens end at the same character (byte-fallback pieces of one
character), the last of them is used, the one after which the character is complete.

    >>> a = [(0, 3), (3, 12), (12, 15)]          # "The" " official" " of"
    >>> b = [(0, 0), (0, 3), (3, 8), (8, 12), (12, 15)]   # <bos> "The" " offi" "cial" " of"
    >>> align_by_end_offset(a, b)
    [(0, 1), (1, 3), (2, 4)]
"""

from __future__ import annotations

from collections.abc import Sequence

from patchscopes.errors import PatchscopeError
from patchscopes.models.loading import ModelHandle

Offsets = Sequence[tuple[int, int]]


class AlignmentError(PatchscopeError, ValueError):
    """Two tokenizations that share no token boundary (or a text that does not tokenize)."""


def _last_token_by_end(offsets: Offsets) -> dict[int, int]:
    ends: dict[int, int] = {}
    for index, (start, end) in enumerate(offsets):
        if end > start:  # zero-width: special tokens
            ends[end] = index  # later tokens with the same end win
    return ends


def align_by_end_offset(offsets_a: Offsets, offsets_b: Offsets) -> list[tuple[int, int]]:
    """``(position in A, position in B)`` for every character offset where a token of each ends.

    Sorted by position; each position appears at most once.
    """
    ends_a, ends_b = _last_token_by_end(offsets_a), _last_token_by_end(offsets_b)
    return sorted((ends_a[end], ends_b[end]) for end in ends_a.keys() & ends_b.keys())


def aligned_positions(
    text: str, source: ModelHandle, target: ModelHandle, skip_first: int = 0
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of ``text`` in both models and the paired positions ``(ids_a, ids_b, pos_a, pos_b)``.

    Models sharing a tokenizer pair every position; others pair by end offset. ``skip_first`` drops
    that many leading pairs (the first token is an attention sink in many models, with outlying norms).

    >>> ids_a, ids_b, pos_a, pos_b = aligned_positions("Hello world", lm, lm_b)   # one tokenizer: every position
    >>> pos_a == pos_b == list(range(len(ids_a)))
    True
    """
    tok_a, tok_b = source.tokenize(text), target.tokenize(text)
    if source.tokenizer is target.tokenizer or (tok_a.ids == tok_b.ids and tok_a.offsets == tok_b.offsets):
        pairs = [(i, i) for i, (s, e) in enumerate(tok_a.offsets) if e > s]
    else:
        pairs = align_by_end_offset(tok_a.offsets, tok_b.offsets)
    if not pairs:
        raise AlignmentError(f"no token of {source.name} and {target.name} ends at the same character of {text!r}")
    pairs = pairs[skip_first:]
    return tok_a.ids, tok_b.ids, [p for p, _ in pairs], [q for _, q in pairs]
