"""The cross-model evaluation end to end in its quick profile (SmolLM2-135M → Gemma-3-270M, different tokenizers)."""

from __future__ import annotations

import pytest

from patchscopes.evals.cross_model import CrossModelConfig, corpus_texts, layer_grid, pick_entities, rouge_l, run_cross_model

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
    assert "2->2" in summary["map_r2"] and len(list((tmp_path / "maps").rglob("map.json"))) == len(summary["map_r2"])
    again = run_cross_model(QUICK, tmp_path / "run", maps_root=tmp_path / "maps")  # resumes: maps reused, nothing recomputed
    assert again == summary
