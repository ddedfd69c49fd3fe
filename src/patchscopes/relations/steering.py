"""Causal steering with concepts: swap a subject's concept and check that the answer follows.

At every hooked block output the last subject token's state ``h`` becomes ``h + β‖h‖(v_new − v_old)``
(edits accumulate through the layers, each scaled by the state's norm there). The edit succeeds when the
answer probability of the new object exceeds the old one's; a multi-token answer counts with its least
likely token (teacher-forced). With ``β = 0`` nothing changes.

    >>> edit = ConceptEdit(prompt, old="negative", new="positive")          # doctest: +SKIP
    >>> causality(lm, concepts, [edit], beta=0.1)                           # doctest: +SKIP
    [True]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscopes.batching import chunks, left_pad
from patchscopes.capture import layer_hooks
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
) -> list[torch.Tensor]:
    """Teacher-forced probabilities of each token of ``answers[i]`` after ``edits[i]`` (one tensor per edit)."""
    hooked = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
    prompts = [RelationPrompt(e.prompt.relation, e.prompt.subject, ans, e.prompt.text) for e, ans in zip(edits, answers)]
    located = [p.locate(lm) for p in prompts]
    deltas = [(concepts.vector(e.new) - concepts.vector(e.old)).to(lm.device, lm.dtype) for e in edits]
    out: list[torch.Tensor] = []
    for group in chunks(list(range(len(edits))), batch_size):
        batch = left_pad([located[i].ids for i in group], lm.pad_id, lm.device)
        rows = torch.arange(len(group), device=lm.device)
        cols = torch.tensor([batch.padded(r, located[i].subject) for r, i in enumerate(group)], device=lm.device)
        delta = torch.stack([deltas[i] for i in group])

        def add(
            layer: int, hidden: torch.Tensor, rows: torch.Tensor = rows, cols: torch.Tensor = cols, delta: torch.Tensor = delta
        ) -> torch.Tensor | None:
            if beta == 0:
                return None
            hidden = hidden.clone()
            h = hidden[rows, cols]
            hidden[rows, cols] = h + beta * h.norm(dim=-1, keepdim=True) * delta
            return hidden

        with layer_hooks(lm.adapter.blocks, hooked, add):
            logits = answer_logits(lm, [located[i] for i in group])
        for r, i in enumerate(group):
            probs = torch.softmax(logits[r], dim=-1).cpu()
            out.append(probs[torch.arange(len(located[i].answer)), torch.tensor(located[i].answer_ids)])
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
    p_new = edited_answer_probs(lm, concepts, edits, beta, [e.new for e in edits], layers, batch_size)
    p_old = edited_answer_probs(lm, concepts, edits, beta, [e.old for e in edits], layers, batch_size)
    return [bool(n.min() > o.min()) for n, o in zip(p_new, p_old)]
