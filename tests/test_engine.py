"""The fast engine (shared prefixes, replayed layers) equals the plain engine, which the other tests hold
to the reference semantics: same logits within float noise, identical greedy text."""

from __future__ import annotations

import pytest
import torch

from patchscopes import (
    ENTITY_DESCRIPTION,
    TOKEN_IDENTITY,
    Generate,
    NextToken,
    Patchscope,
    Source,
    Substring,
    Target,
    run_many,
    sweep,
)
from patchscopes.capture import capture
from patchscopes.engine import run_patched_fast
from patchscopes.errors import EngineError, SpecError
from patchscopes.patching import Patch, PatchedRun, run_patched
from tiny import ARCHS, MLLAMA_BLOCKS_SKIP_THEMSELVES, tiny_model

ATOL = 1e-4  # fp32, tiny models; the fast path changes only the shapes of the matmuls
REAL_ATOL = 5e-4  # fp32, SmolLM2-135M (see test_fast_equals_plain_real)
SOURCES = ["Diana, Princess of Wales", "The capital of France is Paris", "cat"]
TARGETS = [
    ("Syria: Country in the Middle East, x", "x"),
    ("The official currency of x is the", "x"),  # patch before the end: a suffix of several tokens
    ("cat -> cat\n1135 -> 1135\nhello -> hello\n?", "?"),
]


def _grid(lm, decoding):
    from patchscopes import Placeholder

    layers = sorted({0, 1, lm.n_layers // 2, lm.n_layers - 1})
    return [
        Patchscope(Source(s, layer=ls), Target(t, layer=lt, position=Placeholder(ph)), decoding=decoding)
        for s in SOURCES
        for t, ph in TARGETS
        for ls in layers
        for lt in layers
    ]


def _compare(lm, decoding, batch_size=7):
    scopes = _grid(lm, decoding)
    fast = run_many(scopes, lm, batch_size=batch_size, executor="fast")
    plain = run_many(scopes, lm, batch_size=batch_size, executor="plain")
    worst = max((f.logits - p.logits).abs().max().item() for f, p in zip(fast, plain))
    assert worst <= ATOL, worst
    assert [f.generated_ids for f in fast] == [p.generated_ids for p in plain]


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_equals_plain_tiny(arch):
    lm = tiny_model(arch)
    _compare(lm, NextToken())
    _compare(lm, Generate(max_new_tokens=5))


def test_fast_equals_plain_real(smol):
    scopes = [ENTITY_DESCRIPTION.scope(s, layer=l_) for s in SOURCES for l_ in (2, 9, 17, 29)]
    scopes += [TOKEN_IDENTITY.scope(s, layer=l_, target_layer=t) for s in SOURCES for l_ in (0, 15) for t in (3, 29)]
    scopes += [
        Patchscope(
            Source("Diana, Princess of Wales", layer=12),
            Target("The official currency of x is", layer=4, position=Substring("x")),
            decoding=Generate(max_new_tokens=20),
        )
    ]
    fast = run_many(scopes, smol, batch_size=8, executor="fast")
    # the straightforward reference: one target at a time (padded plain batches add their own ~2e-4 noise)
    plain = run_many(scopes, smol, batch_size=1, executor="plain")
    # A different but equally valid order of fp32 reductions (prefix cache + suffix, batched rows) moves
    # SmolLM2's logits (magnitude ~15) by up to ~2.5e-4, the same size as padding noise: same tolerance.
    assert max((f.logits - p.logits).abs().max().item() for f, p in zip(fast, plain)) <= REAL_ATOL
    assert [f.text for f in fast] == [p.text for p in plain]


def test_multi_position_and_add_mode():
    lm = tiny_model("llama")
    target = lm.tokenize("The official currency of the United States is").ids
    vec = torch.randn(2, lm.hidden_size)
    runs = [PatchedRun(target, [Patch(2, [3, 5], vec, mode)]) for mode in ("replace", "add")]
    fast = run_patched_fast(lm, runs, max_new_tokens=4)
    plain = run_patched(lm, runs, max_new_tokens=4)
    for f, p in zip(fast, plain):
        assert (f.logits - p.logits).abs().max() <= ATOL and f.generated == p.generated


def test_sweep_engines_agree_and_fast_rejects_sampling():
    lm = tiny_model("qwen2")
    a = sweep(lm, SOURCES, TOKEN_IDENTITY, target_layers=None, executor="fast", progress=False)
    b = sweep(lm, SOURCES, TOKEN_IDENTITY, target_layers=None, executor="plain", progress=False)
    assert list(a.top1) == list(b.top1)
    assert max(abs(x - y) for x, y in zip(a.top1_prob, b.top1_prob)) < 1e-5
    with pytest.raises(EngineError, match="fast engine"):
        run_many([ENTITY_DESCRIPTION.scope("Diana", layer=1, decoding=Generate(temperature=1.0, seed=0))], lm, executor="fast")


def test_nnsight_executor_through_run_many_and_sweep():
    """``executor=NNsightExecutor()`` runs the same Patchscopes through nnsight traces, with equal results."""
    pytest.importorskip("nnsight", reason="the nnsight backend needs the backends extra")
    from patchscopes.backends.nnsight_backend import NNsightExecutor

    lm = tiny_model("llama")
    scopes = _grid(lm, Generate(max_new_tokens=3))[:12]
    native = run_many(scopes, lm, executor="plain")
    via_nnsight = run_many(scopes, lm, executor=NNsightExecutor())
    assert max((a.logits - b.logits).abs().max().item() for a, b in zip(native, via_nnsight)) <= 1e-5
    assert [a.generated_ids for a in native] == [b.generated_ids for b in via_nnsight]
    df = sweep(lm, SOURCES[:1], TOKEN_IDENTITY, executor=NNsightExecutor(), progress=False)
    assert list(df.top1) == list(sweep(lm, SOURCES[:1], TOKEN_IDENTITY, progress=False).top1)
    with pytest.raises(SpecError, match="executor 'vllm'"):
        run_many(scopes[:1], lm, executor="vllm")  # type: ignore[arg-type]


def _one_by_one(lm, runs, max_new_tokens):
    """The reference: each run alone through the plain engine (no padding, no other rows in its batch)."""
    return [out for run in runs for out in run_patched(lm, [run], max_new_tokens=max_new_tokens)]


def _forward_calls(lm):
    calls = []
    handle = lm.model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_one_wave_runs_variants_of_every_patch_layer(arch):
    """All layers' variants of one target run as one batch (three forwards: prefix, suffix, the wave)."""
    lm = tiny_model(arch)
    target = lm.tokenize("cat -> cat\n1135 -> 1135\nhello -> hello\n?").ids
    source = lm.tokenize("The capital of France is Paris").ids
    layers = list(range(lm.n_layers))
    [states] = capture(lm, [source], [[len(source) - 1]], layers)
    runs = [PatchedRun(target, [Patch(layer, [len(target) - 1], states[layer])]) for layer in reversed(layers)]
    runs += [PatchedRun(target, [Patch(layer, [len(target) - 1], 2 * states[layer])]) for layer in layers]
    calls, handle = _forward_calls(lm)
    try:
        fast = run_patched_fast(lm, runs, batch_size=1)
    finally:
        handle.remove()
    assert len(calls) == 3
    for f, p in zip(fast, _one_by_one(lm, runs, 0)):
        assert (f.logits - p.logits).abs().max() <= ATOL


def test_waves_over_mixed_length_targets_equal_left_padded_plain_batches():
    """Targets of different lengths, patch starts and layers: the fast waves, the plain engine's left-padded
    batch and each run alone all agree."""
    lm = tiny_model("qwen2")
    targets = [lm.tokenize(t).ids for t in ("a b", "The official currency of x is the", "cat -> cat\nhello -> ?")]
    vec = torch.randn(lm.hidden_size)
    runs = [
        PatchedRun(t, [Patch(layer, [position], vec[None])])
        for t in targets
        for position in (1, len(t) - 1)
        for layer in range(lm.n_layers)
    ]
    fast = run_patched_fast(lm, runs, max_new_tokens=4, batch_size=2)
    padded = run_patched(lm, runs, max_new_tokens=4, batch_size=len(runs))
    alone = _one_by_one(lm, runs, 4)
    for f, p, a in zip(fast, padded, alone):
        assert (f.logits - a.logits).abs().max() <= ATOL and (p.logits - a.logits).abs().max() <= ATOL
        assert f.generated == p.generated == a.generated


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others():
    """With an end-of-sequence token that some rows produce early, batched decoding (which drops finished
    rows) generates what each row generates alone."""
    lm = tiny_model("llama")
    target = lm.tokenize("cat -> cat\n1135 -> 1135\nhello -> ?").ids
    runs = [
        PatchedRun(
            target, [Patch(layer, [len(target) - 1], torch.randn(1, lm.hidden_size, generator=torch.Generator().manual_seed(i)))]
        )
        for i in range(6)
        for layer in (0, lm.n_layers - 1)
    ]
    free = run_patched_fast(lm, runs, max_new_tokens=8)
    second = [out.generated[1] for out in free]
    eos = max(set(second), key=second.count)  # a token some rows make second and others never make there
    assert 0 < second.count(eos) < len(runs)
    lm.model.generation_config.eos_token_id = eos
    try:
        fast = run_patched_fast(lm, runs, max_new_tokens=8)
        plain = run_patched(lm, runs, max_new_tokens=8)
        alone = _one_by_one(lm, runs, 8)
    finally:
        lm.model.generation_config.eos_token_id = None
    assert [f.generated for f in fast] == [p.generated for p in plain] == [a.generated for a in alone]
    lengths = {len(a.generated) for a in alone}
    assert min(lengths) < 8 and max(lengths) == 8  # some rows stopped early, others ran to the end


@MLLAMA_BLOCKS_SKIP_THEMSELVES
def test_blocks_that_skip_themselves_keep_the_fast_engine_exact():
    """Mllama's cross-attention blocks skip themselves on text-only input; from transformers 5.25 on their
    cache layers stay empty (keys None). The fast engine leaves such a block in place and replays nothing
    for it: the self-check passes and waves patched around it equal the plain engine."""
    from arch_coverage import build
    from patchscopes.engine import fast_engine_problem
    from patchscopes.models.loading import from_model
    from tiny import tiny_tokenizer

    lm = from_model(build("mllama"), tiny_tokenizer(), name="tiny-mllama")  # block 1 is a cross-attention block
    assert fast_engine_problem(lm) is None
    target = lm.tokenize("cat -> cat\n1135 -> 1135\nhello -> hello\n?").ids
    source = lm.tokenize("The capital of France is Paris").ids
    layers = [layer for layer in range(lm.n_layers) if layer != 1]
    [states] = capture(lm, [source], [[len(source) - 1]], layers)
    runs = [PatchedRun(target, [Patch(layer, [len(target) - 1], state)]) for layer, state in zip(layers, states)]
    fast = run_patched_fast(lm, runs, max_new_tokens=3, batch_size=1)
    for f, p in zip(fast, _one_by_one(lm, runs, 3)):
        assert (f.logits - p.logits).abs().max() <= ATOL
        assert f.generated == p.generated
