"""The cross-model evaluation end to end in its quick profile (SmolLM2-135M → Gemma-3-270M, different tokenizers)."""

from __future__ import annotations

import math

import pytest
import torch

from patchscopes.evals.cross_model import (
    CrossModelConfig,
    corpus_texts,
    layer_grid,
    pick_entities,
    rouge_l,
    run_cross_model,
    same_text_rows,
)
from patchscopes.mappings import AffineMap

QUICK = CrossModelConfig(
    "SmolLM2-135M", "Gemma-3-270M", layer_step=14, n_fit_texts=60, n_eval_texts=4, n_entities=2, entity_layers=(2,), ridge=1.0,
    max_new_tokens=8,
)  # fmt: skip


def test_layer_grid_and_corpus(data_root):
    assert layer_grid(30, 5) == [0, 5, 10, 15, 20, 25, 29]
    fit, held = corpus_texts(50, seed=1), corpus_texts(10, seed=1, offset=50)
    assert len(set(fit)) == 50 and not set(fit) & set(held)
    assert corpus_texts(50, seed=1) == fit


def test_entities_and_rouge():
    ents = pick_entities(4, seed=0)
    assert sorted(ents.popularity) == ["popular", "popular", "rare", "rare"]
    assert rouge_l("American actor", "American actor and film producer") == pytest.approx(2 * 1 * 0.4 / 1.4)


def test_quick_profile_end_to_end(smol, data_root, tmp_path):
    from patchscopes.models.registry import find_registry_model

    entry = find_registry_model("Gemma-3-270M")
    if entry is None or not entry.is_installed():
        pytest.skip("Gemma-3-270M is not installed")
    summary = run_cross_model(QUICK, tmp_path / "run", maps_root=tmp_path / "maps")
    nt = summary["next_token"]
    assert nt["n_texts"] == 4 and set(nt["precision_at_1"]) == {f"{s}->{t}" for s in (0, 14, 28, 29) for t in (0, 14, 17)}
    assert all(0.0 <= v <= 1.0 for v in nt["precision_at_1"].values())
    assert set(summary["entity_rougeL"]) == {
        f"{a}→{b} | {p}"
        for a, b in (("SmolLM2-135M",) * 2, ("Gemma-3-270M",) * 2, ("SmolLM2-135M", "Gemma-3-270M"))
        for p in ("popular", "rare")
    }
    same = summary["same_text"]  # the official variant: B's own run of the same text, with B's unpatched floor
    assert same["n_texts"] == 4 and set(same["precision_at_1"]) == set(nt["precision_at_1"])
    assert 0.0 <= same["unpatched_floor"] <= 1.0 and same["mean_surprisal"] is None  # A cannot score Gemma's tokens
    assert "2->2" in summary["map_r2"] and len(list((tmp_path / "maps").rglob("map.json"))) == len(summary["map_r2"])
    again = run_cross_model(QUICK, tmp_path / "run", maps_root=tmp_path / "maps")  # resumes: maps reused, nothing recomputed
    assert again == summary
    from patchscopes.evals.cross_model import plot_results
    from patchscopes.results import ResultStore

    figures = plot_results(ResultStore.reopen(tmp_path / "run"), "SmolLM2-135M", "Gemma-3-270M")
    assert {p.name for p in figures} == {"precision_at_1.png", "same_text_precision_at_1.png", "entity_rougeL.png"}
    assert all(p.stat().st_size > 1000 for p in figures)


def test_same_text_variant_with_identity_maps_gives_back_the_models_own_prediction(smol, data_root):
    """A → A through identity maps at ℓ* = ℓ changes nothing: every patch, and the floor, is A's own top-1 at the
    chosen position, and the surprisal is A's own −ln max p there (the plain reference: one forward pass)."""
    eye = AffineMap(torch.eye(smol.hidden_size), torch.zeros(smol.hidden_size))
    texts = corpus_texts(3, seed=2)
    maps = {(s, t): eye for s in (3, 20) for t in (3, 20)}
    rows = same_text_rows(smol, smol, maps, texts, [3, 20], [3, 20], seed=1)
    assert len(rows) == 3 * 4
    rows = [r for r in rows if r["source_layer"] == r["target_layer"]]
    assert len(rows) == 6 and all(r["hit"] and r["floor_hit"] for r in rows)
    for r in rows:
        ids = smol.tokenize(texts[r["example"]]).ids
        with torch.no_grad():
            logits = smol.model(torch.tensor([ids])).logits[0, r["source_position"]].float()
        assert r["source_position"] == r["target_position"] and r["source_top1"] == smol.token_strings([int(logits.argmax())])[0]
        assert math.isclose(r["surprisal"], float(-torch.log_softmax(logits, -1).max()), abs_tol=1e-4)
