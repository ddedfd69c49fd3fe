"""The engine's invariants, on tiny random models of eight architectures and on SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from patchscopes import Generate, NextToken, Patchscope, Placeholder, Source, Target, run, run_many
from patchscopes.capture import capture
from patchscopes.patching import Patch, PatchedRun, run_patched, trace

TEXT = "The capital of France is Paris. The capital of Japan is"
OTHER = "Diana, Princess of Wales"
PADDING_ATOL = 5e-4


def test_self_patch_changes_no_logit(tiny):
    ids = tiny.tokenize(TEXT).ids
    for layer in (0, tiny.n_layers // 2, tiny.n_layers - 1, -1):
        [h] = capture(tiny, [ids], [[5]], [layer])
        base, _, _ = trace(tiny, [ids])
        patched, _, _ = trace(tiny, [ids], [[Patch(layer, [5], h[0])]])
        assert (base - patched).abs().max().item() <= 1e-5


def test_self_patch_real_model(smol):
    ids = smol.tokenize(TEXT).ids
    [h] = capture(smol, [ids], [[4, 7]], [10])
    base, _, _ = trace(smol, [ids])
    patched, _, _ = trace(smol, [ids], [[Patch(10, [4, 7], h[0])]])
    assert (base - patched).abs().max().item() <= 1e-5


def test_patch_leaves_earlier_positions_and_layers_unchanged(any_model):
    lm = any_model
    ids = lm.tokenize(TEXT).ids
    layer, pos = lm.n_layers // 2, 6
    all_layers = list(range(lm.n_layers))
    vector = torch.randn(1, lm.hidden_size) * 5
    base_logits, base_h, _ = trace(lm, [ids], layers=all_layers)
    logits, h, _ = trace(lm, [ids], [[Patch(layer, [pos], vector)]], layers=all_layers)
    for l_ in all_layers:
        assert torch.allclose(h[l_][0, :pos], base_h[l_][0, :pos], atol=1e-5), f"layer {l_} changed before {pos}"
        if l_ < layer:
            assert torch.allclose(h[l_][0], base_h[l_][0], atol=1e-5), f"layer {l_} changed below the patch"
    assert torch.allclose(logits[0, :pos], base_logits[0, :pos], atol=1e-4)
    # and the patch does change what comes after it (the test can fail)
    assert (logits[0, pos:] - base_logits[0, pos:]).abs().max() > 1e-3


def _scopes(decoding):
    prompts = [TEXT, OTHER, "Paris", "cat -> cat\n1135 -> 1135\nhello -> hello\n?"]
    targets = ["Syria: Country in the Middle East, x", "cat -> cat\nhello -> hello\n?", "The official currency of x"]
    out = []
    for i, p in enumerate(prompts):
        for j, t in enumerate(targets):
            placeholder = "?" if t.endswith("?") else "x"
            out.append(
                Patchscope(
                    Source(p, layer=(i + j) % 3),
                    Target(t, layer=(i + 2 * j) % 3, position=Placeholder(placeholder)),
                    decoding=decoding,
                )
            )
    return out


@pytest.mark.parametrize("decoding", [NextToken(), Generate(max_new_tokens=6)])
def test_batched_equals_one_at_a_time(any_model, decoding):
    lm = any_model
    scopes = _scopes(decoding)
    batched = run_many(scopes, lm, batch_size=16)
    for scope, got in zip(scopes, batched):
        alone = run(scope, lm)
        # Left padding changes the order of floating-point reductions, nothing else: fp32 logits of size
        # ~15 agree to 5e-4 (relative ~3e-5); same-shape batches agree exactly.
        assert (alone.logits - got.logits).abs().max().item() <= PADDING_ATOL
        assert alone.generated_ids == got.generated_ids


def test_logit_lens_last_layer_is_model_output(any_model):
    from patchscopes import LOGIT_LENS, LogitLens

    lm = any_model
    ids = lm.tokenize(TEXT).ids
    own, _, _ = trace(lm, [ids])
    own_probs = torch.softmax(own[0, -1], -1)
    scope = LOGIT_LENS.scope(TEXT, layer=lm.n_layers - 1, position=-1)
    via_patchscope = torch.softmax(run(scope, lm).logits, -1)
    [h] = capture(lm, [ids], [[len(ids) - 1]], [lm.n_layers - 1])
    via_lens = torch.softmax(LogitLens().logits(lm, lm.n_layers - 1, h[0])[0], -1)
    assert (via_patchscope - own_probs).abs().max().item() <= 1e-5
    assert (via_lens - own_probs).abs().max().item() <= 1e-5


def test_logit_lens_sweep_equals_decoding_the_hidden_state(any_model):
    """The lens's sweep (a Patchscope run by the executors) equals its reference, ``decode(h)`` at the position."""
    from patchscopes import LogitLens

    lm = any_model
    lens = LogitLens()
    layers = [0, 1, lm.n_layers - 2]
    ids = lm.tokenize(TEXT).ids
    [states] = capture(lm, [ids], [[len(ids) - 1]], layers)
    df = lens.sweep(lm, [TEXT], layers=layers, progress=False)
    for i, row in enumerate(df.itertuples()):
        probs = torch.softmax(lens.logits(lm, layers[i], states[i])[0], -1)
        assert row.source_layer == layers[i] and row.top1 == lm.token_strings([int(probs.argmax())])[0]
        assert abs(float(probs.max()) - row.top1_prob) < 1e-4


def _reference_generate(lm, target_ids, layer, positions, vectors, max_new):
    """Plain reference: recompute the whole sequence every step, the patch applied each time, no cache."""
    block = lm.adapter.blocks[layer]

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, positions] = vectors.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    seq = list(target_ids)
    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(max_new):
                logits = lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in lm.eos_ids:
                    break
                seq.append(nxt)
    finally:
        handle.remove()
    return seq[len(target_ids) :]


def test_generation_matches_no_cache_reference(any_model):
    lm = any_model
    target = lm.tokenize("Syria: Country in the Middle East, x").ids
    source = lm.tokenize(OTHER).ids
    layer = lm.n_layers // 2
    [h] = capture(lm, [source], [[len(source) - 1]], [layer])
    vectors = h[0]
    pos = [len(target) - 1]
    expected = _reference_generate(lm, target, layer, pos, vectors, 8)
    # also batched next to a longer unrelated prompt (left padding shifts the target)
    other = PatchedRun(lm.tokenize(TEXT + " and so on and so forth").ids)
    outs = run_patched(lm, [PatchedRun(target, [Patch(layer, pos, vectors)]), other], max_new_tokens=8)
    assert outs[0].generated == expected


def test_add_mode_with_zero_vector_is_identity(tiny):
    ids = tiny.tokenize(TEXT).ids
    base, _, _ = trace(tiny, [ids])
    patched, _, _ = trace(tiny, [ids], [[Patch(1, [3], torch.zeros(1, tiny.hidden_size), mode="add")]])
    assert torch.equal(base, patched)


def test_embeddings_location(tiny):
    """Patching the captured embeddings back in changes nothing; patching other values changes the output."""
    from patchscopes.layers import EMBEDDINGS

    ids = tiny.tokenize(TEXT).ids
    [h] = capture(tiny, [ids], [[2]], [EMBEDDINGS])
    base, _, _ = trace(tiny, [ids])
    same, _, _ = trace(tiny, [ids], [[Patch(EMBEDDINGS, [2], h[0])]])
    other, _, _ = trace(
        tiny, [ids], [[Patch(EMBEDDINGS, [2], h[0] + 3 * torch.randn_like(h[0]))]]
    )  # not a constant: LayerNorm ignores those
    assert (base - same).abs().max() <= 1e-5
    assert (base - other).abs().max() > 1e-3
