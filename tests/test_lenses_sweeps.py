"""Lenses (logit, affine) and sweeps: fast paths equal the generic Patchscope, tidy tables, plots."""

from __future__ import annotations

import pandas as pd
import torch

from patchscopes import TOKEN_IDENTITY, AffineLens, LogitLens, run, sweep
from patchscopes.capture import capture
from patchscopes.sweep import COLUMNS
from tiny import tiny_model

TEXTS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Diana, Princess of Wales, was a member of the British royal family.",
    "Apples are red or green. The official currency of the United States is the dollar.",
] * 4


def test_affine_lens_fast_path_equals_patchscope(tmp_path):
    lm = tiny_model("qwen2")
    lens = AffineLens.fit(lm, TEXTS, layers=range(lm.n_layers), progress=False)
    last = lm.n_layers - 1
    # at the last layer the least-squares map is the identity, so the affine lens equals the logit lens
    assert torch.allclose(lens.maps[last].weight, torch.eye(lm.hidden_size), atol=1e-3)
    df = lens.sweep(lm, [TEXTS[0]], progress=False)
    ids = lm.tokenize(TEXTS[0]).ids
    [states] = capture(lm, [ids], [[len(ids) - 1]], list(range(lm.n_layers)))
    for row in df.itertuples():
        # the reference: the layer's affine map, then the final norm and unembedding
        probs = torch.softmax(lens.logits(lm, row.source_layer, states[row.source_layer])[0], -1)
        assert row.top1 == lm.token_strings([int(probs.argmax())])[0]
        assert abs(float(probs.max()) - row.top1_prob) < 1e-4
        assert run(lens.patchscope(TEXTS[0], row.source_layer), lm).top_tokens[0] == row.top1
    lens.save(tmp_path / "lens")
    again = AffineLens.load(tmp_path / "lens")
    ids = lm.tokenize(TEXTS[1]).ids
    [h] = capture(lm, [ids], [[3]], [1])
    assert torch.equal(again.logits(lm, 1, h[0]), lens.logits(lm, 1, h[0]))


def test_affine_lens_beats_logit_lens_on_fit_quality():
    lm = tiny_model("llama")
    lens = AffineLens.fit(lm, TEXTS, layers=[0, 1], progress=False)
    assert all(m.metadata["n_fit"] > 50 for m in lens.maps.values())


def test_sweep_grid_shape_and_columns(tmp_path):
    from patchscopes import plots

    lm = tiny_model("gpt2")
    df = sweep(lm, TEXTS[:2], TOKEN_IDENTITY, source_layers=[0, 2], target_layers=[1, 2, 3], progress=False)
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 2 * 2 * 3
    assert set(df.source_layer) == {0, 2} and set(df.target_layer) == {1, 2, 3}
    assert df.top1_prob.between(0, 1).all()
    fig = plots.heatmap(df, value="top1_prob")
    assert plots.save(fig, tmp_path / "h.png").stat().st_size > 1000
    same = sweep(lm, TEXTS[:1], TOKEN_IDENTITY, progress=False)
    assert (same.source_layer == same.target_layer).all() and len(same) == lm.n_layers
    everything = sweep(lm, TEXTS[:1], TOKEN_IDENTITY, source_layers=[1], target_layers=None, progress=False)
    assert len(everything) == lm.n_layers


def test_sweep_extra_columns_and_positions():
    lm = tiny_model("llama")
    df = sweep(
        lm,
        ["Diana, Princess of Wales", "The capital of France"],
        "Syria: Country in the Middle East, x",
        source_layers=[1],
        positions=[0, -1],
        extra=lambda r: {"n_generated": len(r.generated_ids)},
        progress=False,
    )
    assert isinstance(df, pd.DataFrame) and "n_generated" in df.columns
    assert list(df.source_position) == [0, len(lm.tokenize("The capital of France").ids) - 1]


def test_token_identity_last_layer_predicts_own_next_token(smol):
    """On real text the token-identity Patchscope at the last layer gives the model's own next token."""
    from patchscopes.patching import trace

    texts = [
        "The capital of France is",
        "Diana, Princess of Wales, was a member of the British royal",
        "Water boils at a temperature of one hundred degrees",
        "The quick brown fox jumps over the lazy",
        "In 1492, Columbus sailed across the Atlantic",
    ]
    last = smol.n_layers - 1
    df = sweep(smol, texts, TOKEN_IDENTITY, source_layers=[last], progress=False)
    for text, (_, row) in zip(texts, df.iterrows()):
        own, _, _ = trace(smol, [smol.tokenize(text).ids])
        own_top = smol.token_strings([int(own[0, -1].argmax())])[0]
        assert row.top1 == own_top, (text, row.top1, own_top)


def test_logit_lens_sweep_real(smol):
    df = LogitLens().sweep(smol, ["The capital of France is"], progress=False)
    assert len(df) == smol.n_layers
    assert df.iloc[-1].top1 == " Paris"


def test_iter_sweep_streams_the_same_rows_in_chunks(monkeypatch):
    import sys

    from patchscopes import iter_sweep

    sweep_module = sys.modules["patchscopes.sweep"]  # the package attribute 'sweep' is the function

    monkeypatch.setattr(sweep_module, "chunk_size", lambda lm, batch_size: 10)
    lm = tiny_model("llama")
    prompts = [f"{t} number {i}" for i, t in enumerate(TEXTS)]
    frames = list(iter_sweep(lm, prompts, TOKEN_IDENTITY, batch_size=4, progress=False))
    whole = sweep(lm, prompts, TOKEN_IDENTITY, batch_size=4, progress=False)
    assert len(frames) > 1 and sum(len(f) for f in frames) == len(whole) == len(prompts) * lm.n_layers
    assert list(pd.concat(frames, ignore_index=True).top1) == list(whole.top1)


def test_first_entry_cuts_at_the_next_few_shot_entry():
    from patchscopes.plots import first_entry, one_line

    assert first_entry(": British monarch, Wimbledon: London borough") == "British monarch"
    assert first_entry(": Japanese-American-born,Iraq: State of") == "Japanese-American-born"
    assert first_entry(": Country in Asia\nChina: x") == "Country in Asia"
    assert one_line(" -> Wales\n\nThe") == " -> Wales⏎⏎The"


def test_per_layer_pair_mapping_gets_resolved_layers():
    from patchscopes import Identity

    seen = []

    def pick(source_layer, target_layer):
        seen.append((source_layer, target_layer))
        return Identity()

    pick.per_layer_pair = True  # type: ignore[attr-defined]
    lm = tiny_model("llama")
    sweep(lm, ["Diana"], TOKEN_IDENTITY, source_layers=[1, 2], mapping=pick, progress=False)
    assert seen == [(1, 1), (2, 2)]


def test_affine_lens_fitted_on_one_position_per_text_as_the_paper():
    """positions_per_text=1 sees exactly one position of each text; the map equals a least-squares fit on them."""
    lm = tiny_model("llama")
    texts = [f"{t} (copy {k})" for k, t in enumerate(TEXTS)]
    one = AffineLens.fit(lm, texts, layers=[1], positions_per_text=1, seed=3, progress=False)
    assert one.maps[1].metadata["n_fit"] == len(texts)
    # the reference: the same seeded draw of one position per text, then plain least squares on those states
    import random

    rng = random.Random(3)
    xs, ys = [], []
    for text in texts:
        ids = lm.tokenize(text).ids
        [states] = capture(lm, [ids], [[sorted(rng.sample(range(1, len(ids)), 1))[0]]], [1, lm.n_layers - 1])
        xs.append(states[0, 0])
        ys.append(states[1, 0])
    x = torch.cat([torch.stack(xs), torch.ones(len(xs), 1)], 1).double()
    solution = torch.linalg.lstsq(x, torch.stack(ys).double(), driver="gelsd").solution
    h = torch.stack(xs[:3])
    assert torch.allclose(one.maps[1](h).double(), x[:3] @ solution, atol=1e-3)
    every = AffineLens.fit(lm, texts, layers=[1], progress=False)
    assert every.maps[1].metadata["n_fit"] > 5 * len(texts)


def test_affine_lens_fit_keeps_to_max_tokens_and_the_models_context(monkeypatch):
    """Long texts: the fit runs only their first ``max_tokens`` tokens (else the context length, 128 here), and
    the map equals a least-squares fit on every position of those first tokens."""
    from patchscopes import lenses

    lm = tiny_model("llama")
    texts = [f"{k}: " + " ".join(TEXTS) * 6 for k in range(4)]  # each several hundred tokens
    assert all(len(lm.tokenize(t).ids) > 300 for t in texts)
    lengths: list[int] = []

    def spy(model, ids, positions, layers, batch_size=16):  # noqa: ANN001, ANN202
        lengths.extend(len(i) for i in ids)
        assert all(max(p) < len(i) for i, p in zip(ids, positions, strict=True))
        return capture(model, ids, positions, layers, batch_size)

    monkeypatch.setattr(lenses, "capture", spy)
    short = AffineLens.fit(lm, texts, layers=[1], max_tokens=12, progress=False)
    assert lengths == [12] * len(texts) and short.maps[1].metadata["n_fit"] == 11 * len(texts)
    lengths.clear()
    AffineLens.fit(lm, texts, layers=[1], positions_per_text=1, progress=False)
    assert max(lengths) <= 128  # cut to the context length, then to the drawn position
    # the reference: every position after the first of each text's first 12 tokens, one text at a time
    xs, ys = [], []
    for text in texts:
        ids = lm.tokenize(text).ids[:12]
        [states] = capture(lm, [ids], [list(range(1, 12))], [1, lm.n_layers - 1])
        xs.append(states[0])
        ys.append(states[1])
    x = torch.cat([torch.cat(xs), torch.ones(11 * len(texts), 1)], 1).double()
    solution = torch.linalg.lstsq(x, torch.cat(ys).double(), driver="gelsd").solution
    assert torch.allclose(short.maps[1](torch.cat(xs)[:5]).double(), x[:5] @ solution, atol=1e-3)
