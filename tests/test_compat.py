"""The compatibility layer on the installed transformers release (CI also runs this on the oldest and newest)."""

from __future__ import annotations

import torch

from patchscopes import compat
from tiny import tiny_model


def test_cache_round_trip_through_the_release_keyword():
    lm = tiny_model("llama")
    ids = torch.tensor([lm.tokenize("The capital of France is").ids])
    full = lm.model(input_ids=ids).logits[:, -1]
    out = lm.model(input_ids=ids[:, :-1], use_cache=True)
    cache = compat.output_cache(out)
    assert compat.is_cache(cache)
    keys, values = compat.layer_kv(cache, 0)
    assert keys.shape[-2] == ids.shape[1] - 1 == values.shape[-2]
    step = lm.model(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(lm.model, cache))
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5)
    assert compat.cache_keyword(lm.model) in compat.CACHE_KEYWORDS


def test_find_cache_under_any_keyword_or_position():
    cache = compat.new_cache(tiny_model("llama").model)
    for keyword in compat.CACHE_KEYWORDS:
        assert compat.find_cache((), {keyword: cache}) is cache
    assert compat.find_cache((torch.zeros(1), cache), {}) is cache
    assert compat.find_cache((torch.zeros(1),), {"use_cache": True}) is None


def test_logits_to_keep_and_attention_switch():
    lm = tiny_model("qwen2")
    ids = torch.tensor([lm.tokenize("cat -> cat").ids])
    kept = lm.model(input_ids=ids, **compat.logits_to_keep_kwargs(lm.model, 1)).logits
    assert kept.shape[1] == (1 if compat.accepts_logits_to_keep(lm.model) else ids.shape[1])
    before = compat.attention_implementation(lm.model)
    lm.model.set_attn_implementation("sdpa")
    try:
        with compat.using_attention(lm.model, "eager") as switched:
            assert switched and compat.attention_implementation(lm.model) == "eager"
        assert compat.attention_implementation(lm.model) == "sdpa"
    finally:
        lm.model.set_attn_implementation(before)


def test_additive_mask_blocks_what_it_should():
    allowed = torch.tril(torch.ones(1, 3, 3, dtype=torch.bool))
    mask = compat.additive_mask(allowed, torch.float32)
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0, 0, 1] == torch.finfo(torch.float32).min and mask[0, 0, 2, 0] == 0
