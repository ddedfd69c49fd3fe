"""Hernandez et al. (2023)'s two measures of an LRE: faithfulness and causality, both with the β scaling of W.

- **Faithfulness.** ``F(s) = β W s + b`` read through the final norm and the unembedding (the attribute
  lens) predicts the same first answer token as the model itself does on the prompt. This is the paper's
  setting when the LRE's object layer is the last block; for an earlier object layer (the LRC convention)
  the read-out is a logit lens of that layer.
- **Causality.** To make prompt p answer the object o' of another prompt p', add
  ``Δs = (βW)†(F(s') − F(s)) = W†(F(s') − F(s)) / β`` to p's last subject token at the subject layer (W† at
  a low rank); it succeeds when the model's first answer token becomes o''s first token.

The paper (GPT-J) fits β per model and reports faithfulness and causality per relation; β > 1 because the
mean Jacobian underestimates the slope of the map it linearises.

    >>> result = lre_faithfulness(lm, lre, prompts, beta=2.25)             # doctest: +SKIP
    >>> result.rate                                                         # doctest: +SKIP
    0.6
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscopes.capture import capture
from patchscopes.models.loading import ModelHandle
from patchscopes.patching import Patch, PatchedRun, run_patched
from patchscopes.relations.lre import LinearRelationalEmbedding, LreError
from patchscopes.relations.prompts import RelationPrompt


@dataclass(frozen=True)
class LreMeasure:
    """Per-prompt outcomes of one measure, and their mean."""

    hits: list[bool]
    predicted: list[int]  # the token each prompt's test produced
    wanted: list[int]  # the token it had to produce

    @property
    def rate(self) -> float:
        return sum(self.hits) / len(self.hits) if self.hits else float("nan")


def _subject_states(lm: ModelHandle, lre: LinearRelationalEmbedding, prompts: Sequence[RelationPrompt]) -> torch.Tensor:
    located = [p.locate(lm) for p in prompts]
    states = capture(lm, [loc.prompt_ids for loc in located], [[loc.subject] for loc in located], [lre.subject_layer])
    return torch.stack([st[0, 0] for st in states]).float()


def _scaled(lre: LinearRelationalEmbedding, subjects: torch.Tensor, beta: float) -> torch.Tensor:
    """``β W s + b`` for subject states ``[n, d]``."""
    return beta * (subjects @ lre.weight.T) + lre.bias


@torch.no_grad()
def lre_faithfulness(
    lm: ModelHandle, lre: LinearRelationalEmbedding, prompts: Sequence[RelationPrompt], beta: float = 1.0
) -> LreMeasure:
    """Share of prompts whose ``β W s + b``, decoded by the attribute lens, gives the model's own first answer token."""
    return lre_faithfulness_grid(lm, lre, prompts, [beta])[float(beta)]


@torch.no_grad()
def lre_faithfulness_grid(
    lm: ModelHandle, lre: LinearRelationalEmbedding, prompts: Sequence[RelationPrompt], betas: Sequence[float]
) -> dict[float, LreMeasure]:
    """:func:`lre_faithfulness` at every β of ``betas``, running the model once (states and answers are shared)."""
    if not prompts:
        raise LreError("no prompts to measure faithfulness on")
    if not betas:
        raise LreError("no β to measure faithfulness at; give at least one, e.g. betas=[1.0]")
    lre.check_model(lm)
    located = [p.locate(lm) for p in prompts]
    own = [int(out.logits.argmax()) for out in run_patched(lm, [PatchedRun(loc.prompt_ids) for loc in located])]
    states = _subject_states(lm, lre, prompts)
    out: dict[float, LreMeasure] = {}
    for beta in betas:
        hidden = _scaled(lre, states, float(beta)).to(device=lm.device, dtype=lm.dtype)
        predicted = lm.adapter.decode(hidden).float().argmax(-1).tolist()
        out[float(beta)] = LreMeasure([p == o for p, o in zip(predicted, own)], predicted, own)
    return out


@torch.no_grad()
def lre_causality(
    lm: ModelHandle,
    lre: LinearRelationalEmbedding,
    prompts: Sequence[RelationPrompt],
    targets: Sequence[RelationPrompt],
    beta: float = 1.0,
    rank: int | None = None,
    batch_size: int = 16,
) -> LreMeasure:
    """Share of edits ``prompts[i] → targets[i]``'s object after adding ``(βW)†(F(s') − F(s))`` at the subject.

    ``targets[i]`` is another prompt of the relation whose object differs; its subject supplies ``s'``.
    """
    return lre_causality_grid(lm, lre, prompts, targets, [beta], rank, batch_size)[float(beta)]


@torch.no_grad()
def lre_causality_grid(
    lm: ModelHandle,
    lre: LinearRelationalEmbedding,
    prompts: Sequence[RelationPrompt],
    targets: Sequence[RelationPrompt],
    betas: Sequence[float],
    rank: int | None = None,
    batch_size: int = 16,
) -> dict[float, LreMeasure]:
    """:func:`lre_causality` at every β of ``betas`` (the subject states are captured once).

    With an exact inverse β cancels: ``(βW)†·β W (s' − s) = W†W (s' − s)``, so the rates differ between β only
    by rounding; the grid makes that visible instead of assuming it.
    """
    if len(prompts) != len(targets) or not prompts:
        raise LreError(f"causality needs one target prompt per prompt; got {len(prompts)} prompts, {len(targets)} targets")
    if not betas:
        raise LreError("no β to measure causality at; give at least one, e.g. betas=[1.0]")
    same = [i for i, (p, t) in enumerate(zip(prompts, targets)) if p.object == t.object]
    if same:
        raise LreError(f"edit {same[0]} asks for the object the prompt already has ({prompts[same[0]].object!r})")
    lre.check_model(lm)
    pinv = lre.pinv(rank)
    s, s_new = _subject_states(lm, lre, prompts), _subject_states(lm, lre, targets)
    located = [p.locate(lm) for p in prompts]
    wanted = [RelationPrompt(p.relation, p.subject, t.object, p.text).locate(lm).answer_ids[0] for p, t in zip(prompts, targets)]
    out: dict[float, LreMeasure] = {}
    for beta in betas:
        deltas = (_scaled(lre, s_new, float(beta)) - _scaled(lre, s, float(beta))) @ (pinv / float(beta)).T
        runs = []
        for loc, delta in zip(located, deltas):
            edit = Patch(lre.subject_layer, [loc.subject], delta[None].to(device=lm.device, dtype=lm.dtype), mode="add")
            runs.append(PatchedRun(loc.prompt_ids, [edit]))
        predicted = [int(o.logits.argmax()) for o in run_patched(lm, runs, 0, batch_size)]
        out[float(beta)] = LreMeasure([p == w for p, w in zip(predicted, wanted)], predicted, wanted)
    return out
