"""Batched forward passes of a model with some parameters replaced (``torch.func.functional_call``), read
at the last prompt position: the shared engine of mask training, faithfulness and knowledge edits.

The model's own weights are never written: a replacement dictionary maps parameter names to tensors used
for this call only.

>>> from patchscopes.circuits.forward import last_logits
>>> logits = last_logits(lm, [[1, 2, 3]], overrides={})
>>> logits.shape == (1, lm.vocab_size)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call

from patchscopes.batching import left_pad


def last_logits(lm, ids: Sequence[Sequence[int]], overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:  # noqa: ANN001
    """Next-token logits ``[len(ids), V]`` after each prompt, with parameters in ``overrides`` replaced.

    Only the last position's logits are computed (prompts are left-padded, so that is every prompt's last
    token), which skips the output projection at every other position. The position is given as an index
    tensor, so the hidden states the projection reads are a contiguous copy: on a strided view PyTorch's
    linear picks another kernel depending on whether the weight requires grad, and an all-ones mask would
    no longer give back the model's logits bit for bit. A model whose forward does not take
    ``logits_to_keep`` computes them all."""
    batch = left_pad(ids, lm.pad_id, lm.device)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}

    def run(extra: dict[str, torch.Tensor]) -> torch.Tensor:
        if overrides:
            return functional_call(lm.model, overrides, args=(), kwargs={**kwargs, **extra}, strict=False).logits
        return lm.model(**kwargs, **extra).logits

    last = torch.tensor([batch.input_ids.shape[1] - 1], device=batch.input_ids.device)
    try:
        logits = run({"logits_to_keep": last})
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        logits = run({})
    return logits[:, -1].float()


def choice_logits(
    lm,  # noqa: ANN001
    ids: Sequence[Sequence[int]],
    target_ids: Sequence[int],
    foil_ids: Sequence[int],
    overrides: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[n, 2]`` logits of target and foil, ``[n, V]`` log-probabilities) after each prompt."""
    logits = last_logits(lm, ids, overrides)
    rows = torch.arange(len(ids))
    pair = torch.stack([logits[rows, torch.tensor(list(target_ids))], logits[rows, torch.tensor(list(foil_ids))]], dim=1)
    return pair, torch.log_softmax(logits, dim=-1)
