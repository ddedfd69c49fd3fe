"""Causal steering with concepts: swap a subject's concept and check that the answer follows.

At every hooked block output the last subject token's state ``h`` becomes ``h + β‖h‖(v_new − v_old)``
(edits accumulate through the layers, each scaled by the state's norm there). The edit succeeds when the
answer probability of the new object exceeds the old one's; a multi-token answer counts with its least
likely token (teacher-forced). With ``β = 0`` nothing changes.

    >>> from patchscopes.relations.lrc import lrc_concepts
    >>> from patchscopes.relations.lre import estimate_lre
    >>> concepts = lrc_concepts(lm, estimate_lre(lm, prompts, subject_layer=1, object_layer=3), prompts, rank=8)
    >>> edit = ConceptEdit(prompts[1], old="Tokyo", new="Paris")
    >>> causality(lm, concepts, [edit], beta=0.1)                  # a random model's answer does not follow
    [False]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from patchscopes.batching import chunks, left_pad
from patchscopes.hooks import at_locations, write
from patchscopes.models.loading import ModelHandle
from patchscopes.relations.lrc import ConceptSet
from patchscopes.relations.prompts import RelationPrompt, answer_logits


@dataclass(frozen=True)
class ConceptEdit:
    """Replace concept ``old`` by ``new`` at ``prompt``'s last subject token."""

    prompt: RelationPrompt
    old: str
    new: str


@torch.no_grad()
def edited_answer_probs(
    lm: ModelHandle,
    concepts: ConceptSet,
    edits: Sequence[ConceptEdit],
    beta: float,
    answers: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    also: Sequence[str] | None = None,
) -> list[Any]:
    """Teacher-forced probabilities of each token of ``answers[i]`` after ``edits[i]`` (one tensor per edit).

    With ``also`` (single-token answers only) each item is a pair: the probabilities of ``answers[i]`` and
    of ``also[i]``, read from the same next-token distribution.
    """
    hooked = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
    prompts = [RelationPrompt(e.prompt.relation, e.prompt.subject, ans, e.prompt.text) for e, ans in zip(edits, answers)]
    located = [p.locate(lm) for p in prompts]
    deltas = [(concepts.vector(e.new) - concepts.vector(e.old)).to(lm.device, lm.dtype) for e in edits]
    out: list[Any] = []
    for group in chunks(list(range(len(edits))), batch_size):
        batch = left_pad([located[i].ids for i in group], lm.pad_id, lm.device)
        rows = torch.arange(len(group), device=lm.device)
        cols = torch.tensor([batch.padded(r, located[i].subject) for r, i in enumerate(group)], device=lm.device)
        delta = torch.stack([deltas[i] for i in group])

        def add(
            layer: object, hidden: torch.Tensor, rows: torch.Tensor = rows, cols: torch.Tensor = cols, delta: torch.Tensor = delta
        ) -> torch.Tensor | None:
            if beta == 0:
                return None
            hidden = hidden.clone()
            write(hidden, (rows, cols), beta * hidden[rows, cols].norm(dim=-1, keepdim=True) * delta, "add")
            return hidden

        with at_locations(lm.adapter.blocks, hooked, add):
            logits = answer_logits(lm, [located[i] for i in group])
        for r, i in enumerate(group):
            probs = torch.softmax(logits[r], dim=-1).cpu()
            mine = probs[torch.arange(len(located[i].answer)), torch.tensor(located[i].answer_ids)]
            if also is None:
                out.append(mine)
            else:
                other = RelationPrompt(edits[i].prompt.relation, edits[i].prompt.subject, also[i], edits[i].prompt.text)
                out.append((mine, probs[0, other.locate(lm).answer_ids[:1]]))
    return out


def causality(
    lm: ModelHandle,
    concepts: ConceptSet,
    edits: Sequence[ConceptEdit],
    beta: float,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> list[bool]:
    """Per edit: does ``min p(new tokens) > min p(old tokens)`` after the edit?"""
    p_new, p_old = new_and_old_probs(lm, concepts, edits, beta, layers, batch_size)
    return [bool(n.min() > o.min()) for n, o in zip(p_new, p_old)]


def new_and_old_probs(
    lm: ModelHandle,
    concepts: ConceptSet,
    edits: Sequence[ConceptEdit],
    beta: float,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Answer-token probabilities of the new and the old object after each edit.

    When both answers are single tokens one forward pass over the prompt gives both (the same numbers as
    the teacher-forced runs, which are used otherwise).
    """
    single = [
        len(RelationPrompt(e.prompt.relation, e.prompt.subject, e.new, e.prompt.text).locate(lm).answer) == 1
        and len(RelationPrompt(e.prompt.relation, e.prompt.subject, e.old, e.prompt.text).locate(lm).answer) == 1
        for e in edits
    ]
    p_new: list[torch.Tensor | None] = [None] * len(edits)
    p_old: list[torch.Tensor | None] = [None] * len(edits)
    fast = [i for i, ok in enumerate(single) if ok]
    if fast:
        both = edited_answer_probs(
            lm,
            concepts,
            [edits[i] for i in fast],
            beta,
            [edits[i].new for i in fast],
            layers,
            batch_size,
            also=[edits[i].old for i in fast],
        )
        for i, (n, o) in zip(fast, both):
            p_new[i], p_old[i] = n, o
    slow = [i for i, ok in enumerate(single) if not ok]
    if slow:
        sub = [edits[i] for i in slow]
        for i, n, o in zip(
            slow,
            edited_answer_probs(lm, concepts, sub, beta, [e.new for e in sub], layers, batch_size),
            edited_answer_probs(lm, concepts, sub, beta, [e.old for e in sub], layers, batch_size),
        ):
            p_new[i], p_old[i] = n, o
    return [t for t in p_new if t is not None], [t for t in p_old if t is not None]
