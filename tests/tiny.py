"""Tiny random-weight models of several architectures and a small byte-level BPE tokenizer, built
offline in milliseconds, for tests of mechanics."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from patchscopes.models.loading import ModelHandle, from_model

#: Where the tiny models run: ``PATCHSCOPES_TEST_DEVICE=cuda`` runs the suite on a GPU (bench/gpu.sh).
TEST_DEVICE = os.environ.get("PATCHSCOPES_TEST_DEVICE", "cpu")

#: For tests of mllama's cross-attention blocks on text-only input: they skip themselves from transformers 5 on.
MLLAMA_BLOCKS_SKIP_THEMSELVES = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="Mllama skips its cross-attention blocks on text-only input from transformers 5 on",
)

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Diana, Princess of Wales, was a member of the British royal family.",
    "cat -> cat\n1135 -> 1135\nhello -> hello\n?",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x",
    "The official currency of x. Apples are red or green. 0123456789",
] * 20


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _config(arch: str, vocab: int, hidden: int = 32):  # noqa: ANN202
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, **common)
    if arch == "llama":
        return tf.LlamaConfig(
            num_hidden_layers=4,
            hidden_size=hidden,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if arch == "qwen2":
        return tf.Qwen2Config(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=8,
            final_logit_softcapping=30.0,
            **common,
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    if arch == "opt":
        return tf.OPTConfig(
            num_hidden_layers=4,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            **common,
        )
    if arch == "phi":
        return tf.PhiConfig(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    if arch == "gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=32, n_head=4, n_positions=128, rotary_dim=4, **common)
    raise ValueError(arch)


ARCHS = ["gpt2", "llama", "qwen2", "gemma3_text", "gpt_neox", "opt", "phi", "gptj"]


@functools.cache
def tiny_model(arch: str, seed: int = 0, hidden: int = 32) -> ModelHandle:
    """A tiny random model; ``hidden`` (llama only) gives a model of another width for mapping tests."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = _config(arch, len(tok), hidden)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.to(TEST_DEVICE)
    return from_model(model, tok, name=f"tiny-{arch}")
