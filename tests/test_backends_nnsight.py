"""The nnsight backend equals the native engine: tiny random models of several architectures and SmolLM2-135M,
next-token and generation, one Patchscope at a time and batched, run in this process and through NDIF's
serialisation (``remote="local"``)."""

from __future__ import annotations

import inspect

import pytest
import torch

from patchscopes.mappings import AffineMap
from patchscopes.positions import Placeholder, Substring
from patchscopes.presets import TOKEN_IDENTITY
from patchscopes.runner import run_many as native_run_many
from patchscopes.scope import Generate, NextToken, Patchscope, PatchscopeResult, Source, Target
from tiny import tiny_model

pytest.importorskip("nnsight")
from patchscopes.backends.nnsight_backend import blocks_envoy, capture_nnsight, run_many_nnsight, wrap  # noqa: E402

TARGET = "cat -> cat\n1135 -> 1135\nhello -> hello\nx"


def run_many(scopes, model, target_model=None, batch_size=16):  # noqa: ANN001, ANN201
    """The native engine's plain padded-batch path (the reference this backend mirrors), on any core version."""
    if "executor" in inspect.signature(native_run_many).parameters:
        return native_run_many(scopes, model, target_model, batch_size=batch_size, executor="plain")
    return native_run_many(scopes, model, target_model, batch_size=batch_size)


def _scopes(decoding) -> list[Patchscope]:  # noqa: ANN001
    """Source/target layers covering embeddings, same-layer, deeper and shallower targets; replace and add."""
    out = []
    for sl, tl in [(1, 2), ("embeddings", 0), (3, "same"), (2, "embeddings"), (-1, 0)]:
        out.append(Patchscope(Source("The capital of France is", sl), Target(TARGET, tl, Placeholder("x")), decoding=decoding))
        out.append(
            Patchscope(
                Source("Diana, Princess of Wales", sl, Substring("Princess")),
                Target(None, tl if tl != "same" else 1, -1),
                mode="add",
                decoding=decoding,
            )
        )
    return out


def _assert_same(native: list[PatchscopeResult], other: list[PatchscopeResult]) -> None:
    assert len(native) == len(other)
    for a, b in zip(native, other):
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        assert b.top_ids == a.top_ids
        assert b.generated_ids == a.generated_ids
        assert b.text == a.text
        assert (b.source_positions, b.target_positions, b.source_layer, b.target_layer) == (
            a.source_positions,
            a.target_positions,
            a.source_layer,
            a.target_layer,
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gemma3_text", "gpt_neox", "opt", "phi", "gptj"])
def test_equals_native_on_tiny_models(arch: str) -> None:
    lm = tiny_model(arch)
    scopes = _scopes(NextToken()) + _scopes(Generate(max_new_tokens=5))
    native = run_many(scopes, lm, batch_size=4)
    _assert_same(native, run_many_nnsight(scopes, lm, batch_size=4))  # batched, mixed lengths
    _assert_same(native[:1] + native[-1:], [run_many_nnsight([s], lm)[0] for s in (scopes[0], scopes[-1])])  # one at a time


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_serialised_request_path_equals_native(arch: str) -> None:
    """``remote="local"`` serialises each trace as for NDIF, deserialises it with this package hidden, runs it."""
    lm = tiny_model(arch)
    scopes = _scopes(NextToken())[:4] + _scopes(Generate(max_new_tokens=4))[:2]
    _assert_same(run_many(scopes, lm, batch_size=3), run_many_nnsight(scopes, lm, batch_size=3, remote="local"))


def test_serialised_request_path_leaves_installed_packages_working(draw_constrained_figure) -> None:  # noqa: ANN001
    """Regression: nnsight's local simulation hid matplotlib and kiwisolver while deserialising; a re-import reset
    kiwisolver's extension and every later constrained-layout figure in the process raised a TypeError."""
    draw_constrained_figure()
    run_many_nnsight(_scopes(NextToken())[:1], tiny_model("llama"), remote="local")
    draw_constrained_figure()


def test_capture_equals_native_capture() -> None:
    from patchscopes.capture import capture

    lm = tiny_model("qwen2")
    ids = [lm.tokenize(p).ids for p in ["The capital of France is", "cat -> cat", "Apples are red or green"]]
    positions = [[len(i) - 1, 0] for i in ids]
    for layers in (["embeddings", 0, 3], [2], [3, 1], [-1]):
        native = capture(lm, ids, positions, layers, batch_size=2)
        got = capture_nnsight(wrap(lm), ids, positions, layers, batch_size=2)
        for a, b in zip(native, got):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_mapping_runs_between_models() -> None:
    """An affine map from one model's layer into another's: the mapping runs on the client, both engines agree."""
    src, tgt = tiny_model("llama"), tiny_model("gpt2")
    torch.manual_seed(0)
    amap = AffineMap(torch.randn(32, 32) * 0.1, torch.randn(32), {"source_model": src.name, "target_model": tgt.name})
    scopes = [
        Patchscope(Source("The capital of France is", 2), Target(TARGET, 1, Placeholder("x")), mapping=amap, decoding=d)
        for d in (NextToken(), Generate(4))
    ]
    _assert_same(run_many(scopes, src, tgt), run_many_nnsight(scopes, src, tgt))


def test_blocks_are_found_through_the_adapter_path() -> None:
    lm = tiny_model("gpt_neox")
    assert len(blocks_envoy(wrap(lm))) == lm.n_layers
    assert wrap(lm).envoy is wrap(lm).envoy  # one wrapper per model


def test_equals_native_on_smollm2(smol) -> None:  # noqa: ANN001
    prompt = "Diana, Princess of Wales"
    scopes = [TOKEN_IDENTITY.scope(prompt, layer=2, position=-1, target_layer=9)]
    scopes += [TOKEN_IDENTITY.scope(prompt, layer=6, position=-1, decoding=Generate(max_new_tokens=3))]
    scopes += [TOKEN_IDENTITY.scope("The capital of France is", layer=6, position=-1, decoding=Generate(max_new_tokens=3))]
    native = run_many(scopes, smol, batch_size=3)
    _assert_same(native, run_many_nnsight(scopes, smol, batch_size=3))  # batched: next token, two generations
    _assert_same(native[1:2], run_many_nnsight(scopes[1:2], smol))  # one generation on its own


def test_progress_callback_counts_every_patchscope() -> None:
    lm = tiny_model("llama")
    scopes = _scopes(NextToken()) + _scopes(Generate(max_new_tokens=2))[:3]
    seen: list[int] = []
    run_many_nnsight(scopes, lm, batch_size=4, on_batch=seen.append)
    assert sum(seen) == len(scopes) and max(seen) <= 4


def test_checkpoint_generation_settings_do_not_change_greedy_decoding() -> None:
    """Logits processors in the model's generation config (here: no token may repeat) must not reach the
    patched generation, which decodes raw logits like the native engine."""
    lm = tiny_model("gpt2")  # its greedy continuations repeat tokens, so the setting would change them
    config = lm.model.generation_config
    saved = (config.repetition_penalty, config.no_repeat_ngram_size)
    scopes = _scopes(Generate(max_new_tokens=6))[:2]
    native = run_many(scopes, lm)
    assert any(len(set(r.generated_ids)) < len(r.generated_ids) for r in native)
    try:
        config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
        _assert_same(native, run_many_nnsight(scopes, lm))
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = saved


def test_sampling_is_reproducible_with_a_seed() -> None:
    lm = tiny_model("llama")
    scopes = [s for s in _scopes(Generate(max_new_tokens=6, temperature=1.0, seed=3))[:2]]
    first, second = run_many_nnsight(scopes, lm), run_many_nnsight(scopes, lm)
    assert [r.generated_ids for r in first] == [r.generated_ids for r in second]
    assert all(len(r.generated_ids) > 0 for r in first)
