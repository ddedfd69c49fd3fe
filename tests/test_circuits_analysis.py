"""Tasks, composition measures, Jaccard overlap and the knowledge-edit view on a tiny model."""

from __future__ import annotations

import pytest
import torch

from patchscopes.circuits.analysis import composition, expected_random_jaccard, jaccard, module_type, overlap
from patchscopes.circuits.circuit import Circuit, CircuitError
from patchscopes.circuits.editing import compare_edits, edit_facts
from patchscopes.circuits.masking import MaskConfig, WeightMask
from patchscopes.circuits.tasks import TASKS, Encoded, Example, TaskError, make_task, new_facts
from tiny import tiny_model


@pytest.mark.parametrize("name", TASKS)
def test_tasks_are_minimal_pairs(name):
    task = make_task(name, n=40, seed=1)
    assert len(task.examples) == 40 and len({e.prompt for e in task.examples}) > 20
    for ex in task.examples:
        assert ex.target != ex.foil and ex.prompt != ex.corrupt
    train, held = task.split(30)
    assert len(train) == 30 and len(held) == 10
    assert make_task(name, n=40, seed=1).examples == task.examples  # deterministic


def test_new_facts_are_held_out_and_false():
    facts = new_facts()
    known = {ex.meta["hyponym"] for ex in make_task("hierarchy", n=70).examples}
    assert facts and all(ex.meta["hyponym"] not in known for ex in facts)
    assert all(ex.target.strip() != ex.meta["true"] and ex.foil.strip() == ex.meta["true"] for ex in facts)
    with pytest.raises(TaskError, match="unknown circuit task"):
        make_task("blimp")


def test_module_types():
    assert module_type("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert module_type("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_type("model.layers.0.input_layernorm.weight") == "norm"
    assert module_type("transformer.h.0.ln_1.bias") == "norm"
    assert module_type("model.norm.weight") == "norm"
    assert module_type("model.embed_tokens.weight") == "embedding"
    assert module_type("transformer.h.0.attn.c_attn.weight") == "attention"


def test_composition_two_measures_differ_as_expected():
    # 1 attention matrix of 100 weights fully kept, 3 norm vectors with 1 kept weight each
    c = Circuit({
        "l.0.self_attn.q_proj.weight": torch.ones(10, 10, dtype=torch.bool),
        "l.0.input_layernorm.weight": torch.tensor([True] + [False] * 9),
        "l.0.post_attention_layernorm.weight": torch.tensor([True] + [False] * 9),
        "l.1.input_layernorm.weight": torch.tensor([True] + [False] * 9),
        "l.0.mlp.up_proj.weight": torch.zeros(10, 10, dtype=torch.bool),
    })  # fmt: skip
    df = composition(c).set_index("module_type")
    assert df.loc["norm", "share_of_kept_params"] == pytest.approx(3 / 103)
    assert df.loc["norm", "share_of_circuit_modules"] == pytest.approx(3 / 4)
    assert df.loc["attention", "type_density"] == 1.0 and df.loc["mlp", "modules_with_kept"] == 0
    assert df.share_of_kept_params.sum() == pytest.approx(1.0) and df.share_of_circuit_modules.sum() == pytest.approx(1.0)


def test_jaccard_against_a_plain_set_computation():
    g = torch.Generator().manual_seed(0)
    a = Circuit({"w": torch.rand(50, 40, generator=g) < 0.3, "b": torch.rand(40, generator=g) < 0.5})
    b = Circuit({"w": torch.rand(50, 40, generator=g) < 0.3, "b": torch.rand(40, generator=g) < 0.5})
    sa = {(n, i) for n in a.names for i in torch.nonzero(a.masks[n].flatten()).flatten().tolist()}
    sb = {(n, i) for n in b.names for i in torch.nonzero(b.masks[n].flatten()).flatten().tolist()}
    assert jaccard(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))
    m = overlap({"a": a, "b": b})
    assert m.loc["a", "a"] == 1.0 and m.loc["a", "b"] == m.loc["b", "a"]
    assert expected_random_jaccard(0.3, 0.3) == pytest.approx(0.09 / 0.51)
    assert jaccard(a, b) == pytest.approx(expected_random_jaccard(a.density, b.density), abs=0.05)
    with pytest.raises(CircuitError, match="same parameters"):
        jaccard(a, Circuit({"w": a.masks["w"]}))


def _facts(lm) -> tuple[Encoded, Encoded]:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, 300, (5,), generator=g).tolist() for _ in range(12)]
    t, f = torch.randint(2, 300, (12,), generator=g).tolist(), torch.randint(2, 300, (12,), generator=g).tolist()
    enc = Encoded([Example("p", "t", "f", "p")] * 12, ids, ids, t, f)
    return enc.subset(list(range(6))), enc.subset(list(range(6, 12)))


def test_edit_only_moves_selected_weights_and_learns():
    lm = tiny_model("llama")
    facts, locality = _facts(lm)
    circuit = WeightMask(lm, MaskConfig(layers=(2, 3))).circuit(0.2)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    row = edit_facts(lm, circuit, facts, locality, steps=15, lr=1e-2)
    assert row["nll_new_post"] < row["nll_new_pre"] and row["delta_nll_new"] < 0
    assert row["success"] >= row["success_pre"]
    assert 0 <= row["locality_unchanged"] <= 1 and row["locality_kl"] >= 0
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n])
    empty = Circuit({n: torch.zeros_like(m) for n, m in circuit.masks.items()})
    still = edit_facts(lm, empty, facts, locality, steps=2)
    assert still["delta_nll_new"] == pytest.approx(0.0, abs=1e-6) and still["locality_kl"] == pytest.approx(0.0, abs=1e-6)
    rows = compare_edits(lm, circuit, facts, locality, steps=3, lr=1e-2)
    assert [r["selection"] for r in rows] == ["circuit", "complement", "random"]
    assert rows[0]["n_trainable"] == rows[2]["n_trainable"] == circuit.n_kept
    assert rows[1]["n_trainable"] == circuit.n_total - circuit.n_kept
