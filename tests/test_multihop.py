"""Multi-hop CoT Patchscope: query building, the attention restriction against a plain reference, restricted
decoding through the core loop, the held-out pair choice, and a quick end-to-end run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from patchscopes.engine import fast_eligible
from patchscopes.evals.multihop import (
    MultihopConfig,
    MultihopError,
    TwoHopQuery,
    answered,
    blind_pi1,
    build_queries,
    cot_patchscope_rows,
    greedy_texts,
    honest_accuracy,
    query_spans,
    random_donor,
    restricted_states,
    run_multihop,
    single_hop_answers,
    summarize_run,
    versus_vanilla,
)
from patchscopes.hooks import at_locations
from patchscopes.patching import Patch, PatchedRun, run_patched, trace
from patchscopes.relations.data import load_relations
from patchscopes.results import ResultStore
from tiny import tiny_model

QUERY = TwoHopQuery("product by company", "company CEO", "Visual Basic", "Microsoft", ("Satya Nadella",))


def test_query_phrasing():
    assert QUERY.prompt == "The CEO of the company that created Visual Basic is"
    assert QUERY.pi2 == "The CEO of" and QUERY.pi1 == "the company that created Visual Basic"
    assert QUERY.hop1_prompt == "The company that created Visual Basic is"
    assert QUERY.hop2_prompt == "The CEO of Microsoft is"


def test_answered_ignores_case_spaces_and_punctuation():
    assert answered(" satya-nadella, who", ["Satya Nadella"])
    assert not answered(" Bill Gates", ["Satya Nadella"])
    assert not answered("anything", [""])


def test_build_queries_chains_first_object_to_second_subject(data_root):
    from patchscopes.relations.data import load_relations

    relations = load_relations()
    queries = build_queries(relations, max_per_combo=5, seed=0)
    assert queries and len({q.combo for q in queries}) >= 5
    for q in queries:
        subjects = {s.subject: s.object for s in relations[q.hop1].samples if s.subject == q.subject}
        assert q.bridge in [s.object for s in relations[q.hop1].samples if s.subject == q.subject], subjects
        assert set(q.answers) <= {s.object for s in relations[q.hop2].samples if s.subject == q.bridge}
        assert q.subject not in q.answers  # no circular chains such as capital-of → country-containing
    counts: dict[str, int] = {}
    for q in queries:
        counts[q.combo] = counts.get(q.combo, 0) + 1
    assert max(counts.values()) <= 5
    assert build_queries(relations, max_per_combo=5, seed=0) == queries
    with pytest.raises(MultihopError, match="must end with the subject slot"):
        build_queries(relations, phrases={"company CEO": "{} has as CEO"})


def _reference_pi1_alone(lm, ids: list[int], pi1: list[int], layers: list[int]) -> torch.Tensor:  # noqa: ANN001
    """π1's tokens run alone, at the positions they hold in the full query: the restriction by construction."""
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int, hidden: torch.Tensor) -> None:
        seen[layer] = hidden[0, -1].detach().float()

    with at_locations(lm.adapter.blocks, layers, grab), torch.no_grad():
        lm.model(input_ids=torch.tensor([[ids[p] for p in pi1]]), position_ids=torch.tensor([pi1]), use_cache=False)
    return torch.stack([seen[layer] for layer in layers])


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_attention_restriction_matches_running_pi1_alone(which, request):
    lm = tiny_model("llama") if which == "tiny" else request.getfixturevalue("smol")
    ids, pi2, pi1 = query_spans(QUERY, lm)
    assert pi2 == list(range(pi2[0], pi2[-1] + 1)) and pi1[0] == pi2[-1] + 1
    assert lm.tokenizer.decode([ids[p] for p in pi1]).strip() == QUERY.pi1
    layers = list(range(lm.n_layers))
    [restricted] = restricted_states(lm, [(ids, pi2, pi1)], layers)
    reference = _reference_pi1_alone(lm, ids, pi1, layers)
    assert torch.allclose(restricted, reference, atol=1e-4 * max(1.0, reference.abs().max().item()))
    # π2 is untouched by the restriction: its last token matches the plain causal pass
    _, plain, _ = trace(lm, [ids], layers=layers)
    _, blind, _ = trace(lm, [ids], layers=layers, blind=[blind_pi1(pi2, pi1)])
    for layer in layers:
        assert torch.allclose(plain[layer][0, pi2[-1]], blind[layer][0, pi2[-1]], atol=1e-5)
    # while π1's last token does change once it cannot see π2
    assert not torch.allclose(plain[layers[-1]][0, pi1[-1]].float(), restricted[-1], atol=1e-3)


def test_restricted_decoding_runs_through_the_core_loop():
    """A blind run's logits are the restricted prefill's; batched equals one at a time; no restriction is plain."""
    lm = tiny_model("llama")
    ids, pi2, pi1 = query_spans(QUERY, lm)
    other = lm.tokenize("Diana, Princess of Wales, was a member of the").ids
    vector = torch.randn(lm.hidden_size) * 3
    runs = [
        PatchedRun(ids, [Patch(1, [pi2[-1]], vector[None])], blind_pi1(pi2, pi1)),
        PatchedRun(other, [Patch(1, [2], vector[None])]),
    ]
    batched = run_patched(lm, runs, max_new_tokens=6, batch_size=2)
    alone = [run_patched(lm, [run], max_new_tokens=6)[0] for run in runs]
    assert [o.generated for o in batched] == [o.generated for o in alone]
    for b, a in zip(batched, alone):
        assert torch.allclose(b.logits, a.logits, atol=1e-4)
    logits, _, _ = trace(lm, [ids], [runs[0].patches], blind=[runs[0].blind])
    assert torch.allclose(batched[0].logits, logits[0, -1], atol=1e-4)
    unrestricted = run_patched(lm, [PatchedRun(ids, runs[0].patches)], max_new_tokens=6)[0]
    assert not torch.allclose(unrestricted.logits, batched[0].logits, atol=1e-3)
    assert not fast_eligible(lm, runs[0]) and fast_eligible(lm, runs[1])  # the replay engine leaves restrictions alone


def test_honest_accuracy_chooses_on_one_half_and_scores_the_other():
    rows = []
    for q in range(8):
        rows.append({"query": q, "source_layer": 0, "target_layer": 0, "correct": q % 2 == 0})
        rows.append({"query": q, "source_layer": 1, "target_layer": 0, "correct": q < 4})
    result = honest_accuracy(rows, list(range(8)), seed=0)
    assert len(result["folds"]) == 2
    truth = {(r["query"], r["source_layer"]): r["correct"] for r in rows}
    for fold in result["folds"]:
        assert fold["chosen_on"] == 4 and fold["scored_on"] == 4 and 0.0 <= fold["accuracy"] <= 1.0
        assert len(fold["correct_queries"]) == round(fold["accuracy"] * 4)
        assert all(truth[(q, fold["pair"][0])] for q in fold["correct_queries"])
    assert 0.0 <= result["accuracy"] <= 1.0


def test_versus_vanilla_counts_repairs_and_losses_query_by_query():
    rows = pd.DataFrame(
        [{"query": q, "kind": "vanilla", "correct": q in (0, 1)} for q in range(4)]
        + [{"query": q, "kind": "cot", "correct": q in (0, 2)} for q in range(4)]
    )
    oracle = pd.Series({0: True, 1: False, 2: True, 3: True})
    heldout = {"folds": [{"correct_queries": [0, 2]}, {"correct_queries": []}]}
    assert versus_vanilla(rows, oracle, heldout) == {
        "vanilla_wrong": 2,  # queries 2 and 3
        "repaired_by_cot_prompt": 1,
        "repaired_by_patchscope_oracle": 2,
        "repaired_by_patchscope_heldout_pair": 1,
        "vanilla_right": 2,  # queries 0 and 1
        "lost_by_cot_prompt": 1,
        "lost_by_patchscope_heldout_pair": 1,
    }


def test_quick_profile_end_to_end(smol, data_root, tmp_path):
    config = MultihopConfig(model="SmolLM2-135M", max_per_combo=2, max_queries=2, layer_step=15, max_new_tokens=8)
    summary = run_multihop(config, tmp_path / "run")
    assert summary["n_built"] > 0 and "n_both_ok" in summary
    assert (tmp_path / "run" / "summary.json").is_file()
    if summary.get("n_evaluated"):
        assert 0.0 <= summary["vanilla"] <= 1.0 and 0.0 <= summary["patchscope_oracle"] <= 1.0
        assert set(summary["pair_accuracy"]) == {f"{s}->{t}" for s in (0, 15, 29) for t in (0, 15, 29)}
    again = run_multihop(config, tmp_path / "run")  # resumes: nothing recomputed, same numbers
    assert again == summary
    assert summarize_run(tmp_path / "run") == summary  # from the directory alone
    if summary.get("n_evaluated"):
        table = pd.read_csv(tmp_path / "run" / "queries.csv")
        assert len(table) == summary["n_evaluated"]
        assert table.vanilla.mean() == pytest.approx(summary["vanilla"])
        assert table.patchscope_oracle.mean() == pytest.approx(summary["patchscope_oracle"])
        assert table.patchscope_heldout.mean() == pytest.approx(summary["patchscope_heldout"]["accuracy"])


def test_random_donor_is_another_bridge_and_stable(data_root):
    queries = build_queries(load_relations(), max_per_combo=3)
    kept = list(range(0, len(queries), 2))
    for qi in kept[:10]:
        donor = random_donor(qi, kept, queries, seed=0)
        assert donor in kept and queries[donor].bridge != queries[qi].bridge
        assert random_donor(qi, list(reversed(kept)), queries, seed=0) == donor  # independent of order (resume)
    same = [k for k in kept if queries[k].bridge == queries[kept[0]].bridge]
    assert random_donor(kept[0], same, queries, seed=0) is None


def test_random_patch_control_patches_the_donors_state(smol, data_root):
    """The control's generation equals the plain Patchscope run on the query with the donor's state patched in."""
    queries = build_queries(load_relations(), max_per_combo=1)[:2]
    [own] = cot_patchscope_rows(smol, [queries[0]], [10], [5], max_new_tokens=6)
    [control] = cot_patchscope_rows(smol, [queries[0]], [10], [5], max_new_tokens=6, donors=[queries[1]])
    ids, pi2, pi1 = query_spans(queries[1], smol)
    [state] = restricted_states(smol, [(ids, pi2, pi1)], [10])
    ids0, pi2_0, pi1_0 = query_spans(queries[0], smol)
    [reference] = run_patched(smol, [PatchedRun(ids0, [Patch(5, [pi2_0[-1]], state[0][None])], blind_pi1(pi2_0, pi1_0))], 6)
    assert control["text"] == smol.tokenizer.decode(reference.generated)
    [own_state] = restricted_states(smol, [(ids0, pi2_0, pi1_0)], [10])
    assert not torch.equal(own_state, state) and own["query"] == control["query"] == 0


def test_single_hop_checks_ask_each_prompt_once_and_resume_by_chunk(smol, tmp_path, monkeypatch):
    import patchscopes.evals.multihop as multihop

    monkeypatch.setattr(multihop, "FILTER_CHUNK", 2)
    prompts = ["The CEO of Microsoft is", "The capital city of France is", "The CEO of Microsoft is",
               "The official currency of Japan is", "The capital city of France is"]  # fmt: skip
    config = MultihopConfig(model="SmolLM2-135M", max_new_tokens=6)
    store = ResultStore(tmp_path / "run", {"eval": "multihop-test"})
    answers = single_hop_answers(smol, store, prompts, config)
    # the reference: each distinct prompt alone, at batch size 1
    assert answers == {p: greedy_texts(smol, [p], 6, 1)[0] for p in set(prompts)}
    assert len(store.frame("single_hops")) == 3 and store.done_keys("single_hops") == {"0", "1"}

    calls = []
    monkeypatch.setattr(multihop, "greedy_texts", lambda *args, **kwargs: calls.append(args) or [])
    assert single_hop_answers(smol, ResultStore.reopen(tmp_path / "run"), prompts, config) == answers
    assert calls == []  # a rerun reads every chunk back and asks nothing again
