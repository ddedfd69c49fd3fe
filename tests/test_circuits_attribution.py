"""Edge attribution patching: exact endpoints of the circuit evaluation, a toy model with one known head."""

from __future__ import annotations

import copy

import pytest
import torch

from patchscopes.circuits.attribution import Graph, attribute, evaluate_edges, faithfulness_curve
from patchscopes.circuits.circuit import CircuitError
from patchscopes.circuits.forward import last_logits
from patchscopes.circuits.tasks import Encoded, Example
from patchscopes.models.loading import from_model
from tiny import tiny_model

KNOWN = "a2.h1"


@pytest.fixture(scope="module")
def toy():
    """Tiny Llama whose layer-2 head 1 writes 25× louder than normal: the answer hinges on it."""
    base = tiny_model("llama")
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[:, 8:16] *= 25.0
    lm = from_model(model, base.tokenizer, name="toy")
    g = torch.Generator().manual_seed(0)
    n = 16
    ids = [torch.randint(2, 300, (6,), generator=g).tolist() for _ in range(n)]
    cor = [torch.randint(2, 300, (6,), generator=g).tolist() for _ in range(n)]
    with torch.no_grad():
        clean, corrupt = last_logits(lm, ids), last_logits(lm, cor)
    targets, foils = (clean - corrupt).argmax(-1).tolist(), (corrupt - clean).argmax(-1).tolist()
    return lm, Encoded([Example("p", "t", "f", "c")] * n, ids, cor, targets, foils)


def test_graph_edges():
    g = Graph.build(n_layers=3, n_heads=2)
    assert g.senders[:4] == ["input", "a0.h0", "a0.h1", "m0"] and g.receivers[-1] == "logits"
    # 7 receivers at positions a0=0, m0=1, ..., logits=6; a sender reaches every receiver after it
    expected = 7 + sum(2 * (6 - 2 * layer) + (5 - 2 * layer) for layer in range(3))
    assert g.n_edges == int(g.valid.sum()) == expected
    assert not g.valid[g.senders.index("m1"), g.receivers.index("m1")]
    assert g.valid[g.senders.index("a1.h0"), g.receivers.index("m1")]


def test_all_edges_is_clean_and_no_edges_is_corrupt(toy):
    lm, data = toy
    graph = Graph.build(lm.n_layers, 4)
    full = evaluate_edges(lm, data, None)
    assert full["circuit"] == pytest.approx(full["clean"], abs=1e-5) and full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    empty = evaluate_edges(lm, data, torch.zeros_like(graph.valid))
    assert empty["circuit"] == pytest.approx(empty["corrupt"], abs=1e-5) and empty["faithfulness"] == pytest.approx(0.0, abs=1e-5)
    assert full["clean"] > full["corrupt"]


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_known_head_ranks_first(toy, method):
    lm, data = toy
    scores = attribute(lm, data, method=method, steps=6)
    components = scores.component_scores().drop("input")
    assert components.index[0] == KNOWN
    top = scores.frame().iloc[0]
    assert (top.sender, top.receiver) == (KNOWN, "logits")
    curve = faithfulness_curve(lm, data, scores, [0, 10, scores.graph.n_edges])
    assert curve.faithfulness.iloc[0] == pytest.approx(0.0, abs=1e-5) and curve.faithfulness.iloc[-1] == pytest.approx(
        1.0, abs=1e-5
    )
    assert curve.faithfulness.iloc[1] > 0.5


def test_scores_approximate_the_exact_edge_effect(toy):
    """Reference: remove the known edge for real (patch its corrupt activation) and measure the change."""
    lm, data = toy
    eap, ig = attribute(lm, data, method="eap"), attribute(lm, data, method="eap-ig", steps=8)
    s, r = eap.graph.senders.index(KNOWN), eap.graph.receivers.index("logits")
    keep = eap.graph.valid.clone()
    keep[s, r] = False
    out = evaluate_edges(lm, data, keep)
    exact = out["circuit"] - out["clean"]
    assert exact < 0 and eap.scores[s, r] < 0 and ig.scores[s, r] < 0
    assert abs(ig.scores[s, r] - exact) < abs(eap.scores[s, r] - exact)  # integrated gradients: closer to the truth


def test_errors(toy):
    lm, data = toy
    bad = Encoded(data.examples[:1], [data.ids[0]], [data.ids[0][:-1]], data.target_ids[:1], data.foil_ids[:1])
    with pytest.raises(CircuitError, match="same_length=True"):
        attribute(lm, bad)
    with pytest.raises(CircuitError, match="eap-ig"):
        attribute(lm, data, method="acdc")
    with pytest.raises(CircuitError, match="norms after the sublayers"):
        attribute(tiny_model("gemma3_text"), data)
