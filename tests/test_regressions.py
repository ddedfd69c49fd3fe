"""Regression tests on SmolLM2-135M for results that were silently wrong (each failed before its fix)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from patchscopes import (
    LOGIT_LENS,
    TOKEN_IDENTITY,
    AffineLens,
    Generate,
    LogitLens,
    NextToken,
    Patchscope,
    Placeholder,
    Source,
    Target,
    capture,
    run,
    run_many,
    sweep,
)
from patchscopes.errors import LayerError, PositionError, SpecError
from patchscopes.layers import EMBEDDINGS
from patchscopes.patching import Patch, trace
from patchscopes.positions import resolve_positions
from tiny import tiny_model

EIFFEL = "The Eiffel Tower is located in the city of"


def test_logit_lens_preset_decodes_the_patched_position(smol):
    ids = smol.tokenize(EIFFEL).ids
    [states] = capture(smol, [ids], [[3]], [10, 20, 29])
    lens = LogitLens().sweep(smol, [EIFFEL], layers=[10, 20, 29], position=3, top_k=3, progress=False)
    for i, (layer, swept) in enumerate(zip((10, 20, 29), lens.top1)):
        # the reference: the final norm and unembedding applied to the hidden state at position 3
        expected = smol.token_strings([int(LogitLens().logits(smol, layer, states[i])[0].argmax())])[0]
        via_preset = run(LOGIT_LENS.scope(EIFFEL, layer, 3), smol)
        via_lens = run(LogitLens().patchscope(EIFFEL, layer, 3), smol)
        assert via_preset.top_tokens[0] == via_lens.top_tokens[0] == swept == expected
    last_layer = run(LOGIT_LENS.scope(EIFFEL, 29, 3), smol)
    assert last_layer.top_tokens[0] != " Paris"  # what the prompt's last position says


def test_affine_lens_negative_layer_uses_its_map_and_a_missing_map_is_an_error(smol):
    texts = ["The capital of France is Paris.", "Diana, Princess of Wales, was a member of the royal family."] * 4
    lens = AffineLens.fit(smol, texts, layers=[27, 28], progress=False)
    scope = lens.patchscope(EIFFEL, -2)
    assert scope.mapping is lens.maps[28]
    assert run(scope, smol).top_probs[0] == pytest.approx(run(lens.patchscope(EIFFEL, 28), smol).top_probs[0], abs=1e-6)
    with pytest.raises(Exception, match="no map for layer 5"):
        lens.patchscope(EIFFEL, 5)


def test_a_seeded_sample_does_not_depend_on_its_batch_mates(smol):
    decoding = Generate(max_new_tokens=6, temperature=0.8, seed=1234)
    scope = Patchscope(Source("Diana, Princess of Wales", layer=5), Target(TOKEN_IDENTITY.target_prompt, layer=5,
                       position=Placeholder("?")), decoding=decoding)  # fmt: skip
    other = Patchscope(Source("The capital of France", layer=9), Target("cat -> cat\n?", layer=9,
                       position=Placeholder("?")), decoding=decoding)  # fmt: skip
    alone = run_many([scope], smol)[0].text
    assert run_many([other, scope], smol)[1].text == alone
    assert run_many([scope, other], smol)[0].text == alone
    assert run_many([other, scope], smol, batch_size=1)[1].text == alone


def test_inspect_layer_range_beyond_the_model_is_an_error(smol):
    from patchscopes.cli import app

    result = CliRunner().invoke(app, ["inspect", "Diana", "--layers", "0-40"])
    assert result.exit_code == 2 and "layer 40 is out of range" in result.output and "Traceback" not in result.output


def test_sweep_with_every_target_layer_gives_every_target_layer(smol):
    table = sweep(smol, ["Diana"], LOGIT_LENS, source_layers=[3], target_layers=None, progress=False)
    assert sorted(table.target_layer) == list(range(smol.n_layers))
    same = sweep(smol, ["Diana"], LOGIT_LENS, source_layers=[3], progress=False)
    assert list(same.target_layer) == [smol.n_layers - 1]  # the logit lens's own rule, ℓ* = L−1


def test_placeholder_is_delimited_and_whole_tokens(smol):
    prompt = "An x-ray of x"
    tok = smol.tokenize(prompt)
    [position] = resolve_positions(Placeholder("x"), prompt, tok.offsets)
    assert tok.offsets[position][1] == len(prompt)  # the last x, not the x of x-ray
    with pytest.raises(PositionError, match="not found"):
        resolve_positions(Placeholder("x"), "An x-ray", smol.tokenize("An x-ray").offsets)
    with pytest.raises(PositionError, match=r"shares a token .*tokens \['\?\?'\]"):
        resolve_positions(Placeholder("?"), "hello??", smol.tokenize("hello??").offsets)  # one token "??"


def test_decoding_options_are_validated():
    with pytest.raises(SpecError, match="top_k"):
        NextToken(top_k=0)
    with pytest.raises(SpecError, match="max_new_tokens"):
        Generate(max_new_tokens=-3)
    with pytest.raises(SpecError, match="temperature"):
        Generate(temperature=-1.0)


def test_fast_engine_with_an_embeddings_patch_raises_instead_of_running_plain():
    from patchscopes.errors import EngineError

    lm = tiny_model("llama")
    with pytest.raises(EngineError, match="embeddings"):
        run_many([TOKEN_IDENTITY.scope("cat", layer=0, target_layer="embeddings")], lm, executor="fast")


def test_minus_one_is_the_last_block_everywhere(smol):
    """-1 is the last block in capture and Patch as it is for users; the embeddings are only "embeddings"."""
    ids = smol.tokenize(EIFFEL).ids
    [h] = capture(smol, [ids], [[3]], [-1, smol.n_layers - 1, EMBEDDINGS])
    assert (h[0] - h[1]).abs().max() == 0
    assert (h[0] - h[2]).abs().max() > 1e-2
    _, seen, _ = trace(smol, [ids], layers=[-1])
    assert list(seen) == [smol.n_layers - 1]
    patched, _, _ = trace(smol, [ids], [[Patch(-1, [3], h[2])]])
    by_index, _, _ = trace(smol, [ids], [[Patch(smol.n_layers - 1, [3], h[2])]])
    assert (patched - by_index).abs().max() == 0
    with pytest.raises(LayerError, match="out of range"):
        capture(smol, [ids], [[3]], [smol.n_layers])
