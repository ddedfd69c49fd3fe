"""load_model from a local directory (offline), and the handle it returns."""

from __future__ import annotations

import torch

from patchscopes import TOKEN_IDENTITY, load_model, run
from tiny import tiny_model


def test_load_local_directory_matches_in_memory_model(tmp_path):
    # GPT-2: its tokenizer class reloads the tiny byte-level BPE unchanged (a model type with its own
    # tokenizer class, e.g. qwen2, would reload it with that class's pre-tokenizer)
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.name == "m" and loaded.n_layers == lm.n_layers and loaded.hidden_size == lm.hidden_size
    scope = TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=1)
    assert loaded.tokenize(TOKEN_IDENTITY.target_prompt or "").ids == lm.tokenize(TOKEN_IDENTITY.target_prompt or "").ids
    assert torch.allclose(run(scope, loaded).logits, run(scope, lm).logits, atol=1e-5)
    assert "layers=4" in repr(loaded)


def test_bfloat16_load(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    result = run(TOKEN_IDENTITY.scope("Diana", layer=2), loaded)
    assert result.logits.dtype == torch.float32 and torch.isfinite(result.logits).all()


def test_the_tokenizer_is_read_from_the_same_snapshot_as_the_model(tmp_path):
    """Options that pick the files (here ``subfolder``; ``revision`` and ``trust_remote_code`` alike) reach the
    tokenizer too: a checkpoint kept in a subfolder loads whole, tokenizer included."""
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path / "m" / "v2")
    lm.tokenizer.save_pretrained(tmp_path / "m" / "v2")
    loaded = load_model(str(tmp_path / "m"), subfolder="v2")
    text = "Diana, Princess of Wales"
    assert loaded.tokenize(text).ids == lm.tokenize(text).ids
    scope = TOKEN_IDENTITY.scope(text, layer=1)
    assert torch.allclose(run(scope, loaded).logits, run(scope, lm).logits, atol=1e-5)
