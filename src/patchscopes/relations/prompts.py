"""Prompts for one relation sample: few-shot (training) and zero-shot (evaluation), with token positions.

A :class:`RelationPrompt` is a prompt ending just before the object, plus the object as the answer. Its
:meth:`~RelationPrompt.locate` gives the last subject token, the answer tokens and the positions that
*predict* them (the last prompt token predicts the first answer token), all from character offsets.

    >>> rel = load_relation(data_file("relations/commonsense/word_sentiment.json"))   # doctest: +SKIP
    >>> p = few_shot_prompt(rel, rel.samples[0], n_examples=3, seed=0)               # doctest: +SKIP
    >>> p.text.splitlines()[-1]                                                      # doctest: +SKIP
    "The sentiment of 'happy' is"
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscopes import compat
from patchscopes.batching import chunks, left_pad
from patchscopes.errors import PatchscopeError, PositionError
from patchscopes.models.loading import ModelHandle
from patchscopes.positions import char_span_to_tokens
from patchscopes.relations.data import Relation, RelationSample


class RelationPromptError(PatchscopeError, ValueError):
    """A relation prompt that cannot be built or located (template without ``{}``, subject not found, …)."""


@dataclass(frozen=True)
class RelationPrompt:
    """``text`` ends right before the answer; the answer is ``" " + object`` appended to it."""

    relation: str
    subject: str
    object: str
    text: str

    @property
    def full_text(self) -> str:
        return f"{self.text} {self.object}"

    def locate(self, lm: ModelHandle) -> Located:
        """Token ids of the prompt plus answer, the last subject token and the answer positions."""
        tok = lm.tokenize(self.full_text)
        start = self.text.rfind(self.subject)
        if start < 0:
            raise RelationPromptError(f"subject {self.subject!r} not found in prompt {self.text!r}")
        subject_tokens = char_span_to_tokens(tok.offsets, start, start + len(self.subject))
        answer_tokens = char_span_to_tokens(tok.offsets, len(self.text) + 1, len(self.full_text))
        if not subject_tokens or not answer_tokens:
            raise PositionError(f"no token covers the subject or the answer in {self.full_text!r}")
        if answer_tokens[0] <= subject_tokens[-1]:
            raise RelationPromptError(
                f"the tokenizer merges the subject {self.subject!r} with the answer {self.object!r}; drop this sample"
            )
        return Located(ids=list(tok.ids), subject=subject_tokens[-1], answer=answer_tokens)


@dataclass(frozen=True)
class Located:
    """Token-level view of a :class:`RelationPrompt` (positions index ``ids``)."""

    ids: list[int]
    subject: int
    answer: list[int]

    @property
    def predicting(self) -> list[int]:
        """Positions whose next-token prediction is an answer token."""
        return [p - 1 for p in self.answer]

    @property
    def prompt_ids(self) -> list[int]:
        return self.ids[: self.answer[0]]

    @property
    def answer_ids(self) -> list[int]:
        return [self.ids[p] for p in self.answer]


def _stable_seed(*parts: object) -> int:
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def few_shot_prompt(
    relation: Relation,
    sample: RelationSample,
    n_examples: int = 3,
    seed: int = 0,
    template: int = 0,
    pool: Sequence[RelationSample] | None = None,
) -> RelationPrompt:
    """A training prompt: ``n_examples`` solved examples (one per line), then the query.

    The examples are drawn from ``pool`` (default: the relation's other samples) with a generator seeded by
    the relation, the subject and ``seed``, so a sample always gets the same prompt.
    """
    candidates = [s for s in (pool if pool is not None else relation.samples) if s.subject != sample.subject]
    rng = random.Random(_stable_seed(relation.name, sample.subject, seed))
    examples = rng.sample(candidates, min(n_examples, len(candidates)))
    form = relation.prompt_templates[template % len(relation.prompt_templates)]
    lines = [f"{form.format(ex.subject)} {ex.object}" for ex in examples]
    lines.append(form.format(sample.subject))
    return RelationPrompt(relation.name, sample.subject, sample.object, "\n".join(lines))


def zero_shot_prompts(relation: Relation, sample: RelationSample) -> list[RelationPrompt]:
    """One evaluation prompt per zero-shot template of the relation."""
    subject, obj = sample.subject, sample.object
    return [RelationPrompt(relation.name, subject, obj, t.format(subject)) for t in relation.prompt_templates_zs]


def answer_logits(lm: ModelHandle, located: Sequence[Located]) -> list[torch.Tensor]:
    """One padded forward pass; the logits ``[n_answer_tokens, V]`` at each prompt's answer-predicting positions.

    Only the last columns go through the unembedding when the model accepts ``logits_to_keep``. Runs under
    whatever hooks the caller has installed (steering uses this).
    """
    batch = left_pad([loc.ids for loc in located], lm.pad_id, lm.device)
    keep = max(len(loc.ids) - loc.predicting[0] for loc in located)  # left padding: the needed columns are the last ones
    extra = compat.logits_to_keep_kwargs(lm.model, keep)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).logits
    offset = batch.width - logits.shape[1]
    out = []
    for row, loc in enumerate(located):
        cols = torch.tensor([batch.padded(row, p) - offset for p in loc.predicting], device=logits.device)
        out.append(logits[row, cols].float())
    return out


@torch.no_grad()
def answer_logprobs(lm: ModelHandle, prompts: Sequence[RelationPrompt], batch_size: int = 16) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities of each answer token (one tensor per prompt, length = answer tokens)."""
    located = [p.locate(lm) for p in prompts]
    out: list[torch.Tensor] = []
    for group in chunks(located, batch_size):
        for loc, logits in zip(group, answer_logits(lm, group)):
            logp = torch.log_softmax(logits, dim=-1).cpu()
            out.append(logp[torch.arange(len(loc.answer)), torch.tensor(loc.answer_ids)])
    return out


@torch.no_grad()
def answers_correctly(lm: ModelHandle, prompts: Sequence[RelationPrompt], batch_size: int = 16) -> list[bool]:
    """Whether greedy decoding produces every answer token (teacher forcing: each argmax equals the answer token).

    This is exactly "greedy generation starts with the object", multi-token objects included.
    """
    located = [p.locate(lm) for p in prompts]
    out: list[bool] = []
    for group in chunks(located, batch_size):
        for loc, logits in zip(group, answer_logits(lm, group)):
            out.append(bool((logits.argmax(-1).cpu() == torch.tensor(loc.answer_ids)).all()))
    return out


def filter_correct(
    lm: ModelHandle, relation: Relation, n_examples: int = 3, seed: int = 0, batch_size: int = 16
) -> list[RelationSample]:
    """The samples (one per subject) whose few-shot prompt the model answers correctly."""
    seen: set[str] = set()
    unique = []
    for s in relation.samples:
        if s.subject not in seen:
            seen.add(s.subject)
            unique.append(s)
    prompts, kept = [], []
    for s in unique:
        p = few_shot_prompt(relation, s, n_examples=n_examples, seed=seed)
        try:
            p.locate(lm)
        except PatchscopeError:
            continue
        prompts.append(p)
        kept.append(s)
    ok = answers_correctly(lm, prompts, batch_size=batch_size)
    return [s for s, good in zip(kept, ok) if good]
