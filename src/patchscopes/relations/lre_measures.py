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
    if not prompts:
        raise LreError("no prompts to measure faithfulness on")
    lre.check_model(lm)
    located = [p.locate(lm) for p in prompts]
    own = [int(out.logits.argmax()) for out in run_patched(lm, [PatchedRun(loc.prompt_ids) for loc in located])]
    hidden = _scaled(lre, _subject_states(lm, lre, prompts), beta).to(device=lm.device, dtype=lm.dtype)
    predicted = lm.adapter.decode(hidden).float().argmax(-1).tolist()
    return LreMeasure([p == o for p, o in zip(predicted, own)], predicted, own)


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
    if len(prompts) != len(targets) or not prompts:
        raise LreError(f"causality needs one target prompt per prompt; got {len(prompts)} prompts, {len(targets)} targets")
    same = [i for i, (p, t) in enumerate(zip(prompts, targets)) if p.object == t.object]
    if same:
        raise LreError(f"edit {same[0]} asks for the object the prompt already has ({prompts[same[0]].object!r})")
    lre.check_model(lm)
    inverse = lre.pinv(rank) / beta
    s, s_new = _subject_states(lm, lre, prompts), _subject_states(lm, lre, targets)
    deltas = (_scaled(lre, s_new, beta) - _scaled(lre, s, beta)) @ inverse.T
    runs, wanted = [], []
    for prompt, target, delta in zip(prompts, targets, deltas):
        loc = prompt.locate(lm)
        edit = Patch(lre.subject_layer, [loc.subject], delta[None].to(device=lm.device, dtype=lm.dtype), mode="add")
        runs.append(PatchedRun(loc.prompt_ids, [edit]))
        wanted.append(RelationPrompt(prompt.relation, prompt.subject, target.object, prompt.text).locate(lm).answer_ids[0])
    predicted = [int(out.logits.argmax()) for out in run_patched(lm, runs, 0, batch_size)]
    return LreMeasure([p == w for p, w in zip(predicted, wanted)], predicted, wanted)
