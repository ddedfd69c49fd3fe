"""LRE/LRC mechanics on tiny models and toy maps: Jacobians, pseudo-inverse, concepts, steering, splits, baselines."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from patchscopes.mappings import AffineMap
from patchscopes.relations.baselines import averaging_concepts, svm_concepts
from patchscopes.relations.data import RelationSample
from patchscopes.relations.evaluate import summarise
from patchscopes.relations.jacobian import prompt_jacobian
from patchscopes.relations.jcache import JacobianCache
from patchscopes.relations.lrc import ConceptError, ConceptSet, lrc_from_objects, object_states
from patchscopes.relations.lre import LinearRelationalEmbedding, LreError, estimate_lre, low_rank_pinv
from patchscopes.relations.prompts import RelationPrompt, RelationPromptError, answer_logprobs
from patchscopes.relations.splits import split_by_object
from patchscopes.relations.steering import ConceptEdit, causality, edited_answer_probs
from tiny import tiny_model

PROMPT = RelationPrompt("capital", "France", "Paris", "The capital of Japan is Tokyo. The capital of France is")


class CumulativeLinear(nn.Module):
    """An exactly linear, causal block: position t gets ``A · Σ_{u≤t} h_u + c`` (prefix positions add constants)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states.cumsum(dim=1) @ self.weight.T + self.bias


@pytest.fixture()
def llama():  # noqa: ANN201
    return tiny_model("llama")


def test_locate_finds_subject_and_answer(llama) -> None:  # noqa: ANN001
    loc = PROMPT.locate(llama)
    text = llama.tokenizer.decode(loc.ids[loc.answer[0] :])
    assert text.strip() == "Paris"
    assert "France" in llama.tokenizer.decode(loc.ids[: loc.subject + 1])[-8:]
    assert loc.predicting == [p - 1 for p in loc.answer]
    with pytest.raises(RelationPromptError, match="not found"):
        RelationPrompt("r", "Germany", "Berlin", "The capital of France is").locate(llama)


@pytest.mark.parametrize("aggregation", ["mean", "first"])
def test_jacobian_of_exactly_linear_map_is_its_weight(aggregation) -> None:  # noqa: ANN001
    llama = tiny_model("llama", seed=9001)  # a private instance: one block is replaced below
    torch.manual_seed(0)
    d = llama.hidden_size
    weight, bias = torch.randn(d, d), torch.randn(d)
    llama.adapter.blocks[2] = CumulativeLinear(weight, bias)
    jac = prompt_jacobian(llama, PROMPT.locate(llama), subject_layer=1, object_layers=[2], aggregation=aggregation)
    assert jac.weight.shape == (1, d, d)
    torch.testing.assert_close(jac.weight[0], weight, atol=1e-4, rtol=1e-4)


def test_forward_and_reverse_mode_agree_and_linearise_at_the_prompt(llama) -> None:  # noqa: ANN001
    loc = PROMPT.locate(llama)
    both = prompt_jacobian(llama, loc, subject_layer=0, object_layers=[1, 3])  # forward mode, two layers in one pass
    for k, layer in enumerate([1, 3]):
        single = prompt_jacobian(llama, loc, subject_layer=0, object_layers=[layer])  # reverse mode
        torch.testing.assert_close(both.weight[k], single.weight[0], atol=1e-5, rtol=1e-4)
        # the object state from the cached-prefix pass equals a plain full-prompt capture
        torch.testing.assert_close(single.object[0], object_states(llama, [PROMPT], layer)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(single.bias[0] + single.weight[0] @ single.subject, single.object[0], atol=1e-5, rtol=1e-4)


def test_jacobian_cache_reuses_a_multi_layer_entry(llama, tmp_path) -> None:  # noqa: ANN001
    cache = JacobianCache(tmp_path)
    loc = PROMPT.locate(llama)
    both = cache(llama, loc, 0, [1, 3])
    again = cache(llama, loc, 0, [3])
    assert (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(again.weight[0], both.weight[1])


def test_jacobian_cache_computes_an_entry_once_for_concurrent_callers(llama, tmp_path) -> None:  # noqa: ANN001
    """Two callers of one entry at once: one computes it under the entry's lock, the other waits and reads it
    (the hand-written lock was released before the file was written, so a waiter could compute it again)."""
    from concurrent.futures import ThreadPoolExecutor

    caches = [JacobianCache(tmp_path), JacobianCache(tmp_path)]
    loc = PROMPT.locate(llama)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda cache: cache(llama, loc, 0, [2]), caches)
    assert sorted((c.misses, c.hits) for c in caches) == [(0, 1), (1, 0)]
    torch.testing.assert_close(a.weight, b.weight)
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix != ".lock"] == [".safetensors"]


def test_pinv_full_rank_inverts_and_low_rank_matches_truncated_svd() -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 12) + 4 * torch.eye(12)
    torch.testing.assert_close(low_rank_pinv(w) @ w, torch.eye(12), atol=1e-4, rtol=1e-4)
    u, s, vh = torch.linalg.svd(w.double())
    truncated = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(low_rank_pinv(w, 5).double(), torch.linalg.pinv(truncated), atol=1e-6, rtol=1e-5)
    with pytest.raises(LreError, match="outside 1..12"):
        low_rank_pinv(w, 13)


def test_lre_save_load_mapping_and_model_check(llama, tmp_path) -> None:  # noqa: ANN001
    lre = estimate_lre(llama, [PROMPT], subject_layer=0, object_layer=2)
    assert lre.metadata["model"] == llama.name and lre.metadata["n_prompts"] == 1
    back = LinearRelationalEmbedding.load(lre.save(tmp_path / "lre"))
    torch.testing.assert_close(back.weight, lre.weight)
    assert back.metadata["subject_layer"] == 0 and back.metadata["object_layer"] == 2
    mapping = back.as_mapping()
    assert isinstance(mapping, AffineMap)
    h = torch.randn(3, llama.hidden_size)
    torch.testing.assert_close(mapping(h), h @ lre.weight.T + lre.bias)
    logits = lre.attribute_lens(llama, h[0])
    expected = llama.adapter.decode((h[0] @ lre.weight.T + lre.bias)[None])[0]
    torch.testing.assert_close(logits.reshape(-1), expected.reshape(-1).float())
    with pytest.raises(LreError, match="not a saved LRE"):
        LinearRelationalEmbedding.load(tmp_path / "nothing")


def test_lrc_concepts_invert_the_lre_exactly_at_full_rank() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(6, 6) + 3 * torch.eye(6), torch.randn(6)
    lre = LinearRelationalEmbedding(w, b, {"subject_layer": 1, "object_layer": 2})
    subjects = torch.randn(4, 6)
    concepts = lrc_from_objects(lre, lre(subjects), ["a", "a", "b", "c"], rank=None)
    expected = subjects[:2].mean(0)
    torch.testing.assert_close(concepts.vector("a"), expected / expected.norm(), atol=1e-5, rtol=1e-4)
    assert concepts.classify(subjects[2:3] * 10) == ["b"]


def test_concept_set_save_load_and_errors(tmp_path) -> None:  # noqa: ANN001
    cs = ConceptSet(["x", "y"], torch.eye(2, 3), {"method": "lrc", "subject_layer": 4})
    back = ConceptSet.load(cs.save(tmp_path / "c"))
    assert back.names == ["x", "y"] and back.metadata["subject_layer"] == 4
    torch.testing.assert_close(back.vectors, cs.vectors)
    with pytest.raises(ConceptError, match="no concept named 'z'"):
        cs.vector("z")


def test_steering_with_beta_zero_changes_nothing(llama) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    concepts = ConceptSet(["Paris", "Tokyo"], torch.randn(2, llama.hidden_size))
    edits = [ConceptEdit(PROMPT, "Paris", "Tokyo")]
    plain = answer_logprobs(llama, [PROMPT])[0].exp()
    unchanged = edited_answer_probs(llama, concepts, edits, 0.0, ["Paris"])[0]
    torch.testing.assert_close(unchanged, plain, atol=1e-6, rtol=1e-5)
    changed = edited_answer_probs(llama, concepts, edits, 2.0, ["Paris"])[0]
    assert not torch.allclose(changed, plain)
    tokyo = RelationPrompt(PROMPT.relation, PROMPT.subject, "Tokyo", PROMPT.text)
    assert causality(llama, concepts, edits, 0.0) == [bool(answer_logprobs(llama, [tokyo])[0].exp().min() > plain.min())]


def test_split_is_half_per_object_with_a_training_sample_each() -> None:
    samples = [RelationSample(f"s{i}", "a") for i in range(5)] + [RelationSample("t", "b")]
    train, test = split_by_object(samples, seed=3)
    assert sorted(s.object for s in train) == ["a", "a", "a", "b"] and [s.object for s in test] == ["a", "a"]
    assert split_by_object(samples, seed=3) == (train, test)
    assert split_by_object(samples, seed=4) != (train, test)


def test_baselines_separate_separable_classes() -> None:
    torch.manual_seed(0)
    centres = torch.eye(3, 8) * 5
    x = torch.cat([centres[i] + 0.3 * torch.randn(10, 8) for i in range(3)])
    labels = [c for c in "abc" for _ in range(10)]
    for concepts in (svm_concepts(x, labels), averaging_concepts(x, labels)):
        assert concepts.classify(centres) == ["a", "b", "c"]
        torch.testing.assert_close(concepts.vectors.norm(dim=-1), torch.ones(3))
    two = svm_concepts(x[:20], labels[:20])
    assert two.classify(centres[:2]) == ["a", "b"]


def test_summary_is_macro_over_relations_then_over_seeds() -> None:
    rows = pd.DataFrame(
        [
            {"method": "LRC", "kind": "accuracy", "seed": 1, "relation": "r1", "ok": True},
            {"method": "LRC", "kind": "accuracy", "seed": 1, "relation": "r1", "ok": True},
            {"method": "LRC", "kind": "accuracy", "seed": 1, "relation": "r1", "ok": True},
            {"method": "LRC", "kind": "accuracy", "seed": 1, "relation": "r2", "ok": False},
            {"method": "LRC", "kind": "accuracy", "seed": 2, "relation": "r1", "ok": True},
            {"method": "LRC", "kind": "accuracy", "seed": 2, "relation": "r2", "ok": True},
        ]
    )
    table = summarise(rows)["table"]["LRC"]["accuracy"]
    assert table["mean"] == pytest.approx((0.5 + 1.0) / 2) and table["std"] == pytest.approx(0.25) and table["seeds"] == 2


def test_single_token_fast_path_equals_teacher_forcing(llama) -> None:  # noqa: ANN001
    from patchscopes.relations.steering import new_and_old_probs

    torch.manual_seed(1)
    concepts = ConceptSet(["of", "Tokyo", "is"], torch.randn(3, llama.hidden_size))
    edits = [ConceptEdit(PROMPT, "of", "is"), ConceptEdit(PROMPT, "of", "Tokyo")]  # one-token and two-token answers
    lengths = [len(RelationPrompt("r", "France", o, PROMPT.text).locate(llama).answer) for o in ("of", "is", "Tokyo")]
    assert lengths == [1, 1, 2]
    new, old = new_and_old_probs(llama, concepts, edits, 0.5)
    for i, edit in enumerate(edits):
        torch.testing.assert_close(new[i], edited_answer_probs(llama, concepts, [edit], 0.5, [edit.new])[0])
        torch.testing.assert_close(old[i], edited_answer_probs(llama, concepts, [edit], 0.5, [edit.old])[0])


def test_attribute_lens_patchscope_equals_decoding_w_s_plus_b(llama) -> None:  # noqa: ANN001
    from patchscopes.relations.bridges import attribute_lens_scope, describe_concept
    from patchscopes.relations.lrc import subject_states
    from patchscopes.runner import run

    lre = estimate_lre(llama, [PROMPT], subject_layer=1, object_layer=-1, aggregation="first")
    assert lre.object_layer == llama.n_layers - 1
    result = run(attribute_lens_scope(lre, PROMPT.text, PROMPT.subject), llama)
    state = subject_states(llama, [PROMPT], 1)[0]
    torch.testing.assert_close(result.logits.float(), lre.attribute_lens(llama, state), atol=1e-4, rtol=1e-4)
    concepts = ConceptSet(["a", "b"], torch.eye(2, llama.hidden_size), {"subject_layer": 1, "subject_norm": 3.0})
    description = describe_concept(llama, concepts, "b")
    assert len(description.top_tokens) == 10 and description.text == description.top_tokens[0]


OTHER = RelationPrompt("capital", "Italy", "Rome", "The capital of Japan is Tokyo. The capital of Italy is")


def test_lre_faithfulness_equals_decoding_beta_w_s_plus_b_by_hand(llama) -> None:  # noqa: ANN001
    from patchscopes.relations.lre_measures import lre_faithfulness

    lre = estimate_lre(llama, [PROMPT, OTHER], subject_layer=1, object_layer=-1, aggregation="first")
    for beta in (1.0, 2.5):
        got = lre_faithfulness(llama, lre, [PROMPT, OTHER], beta=beta)
        for k, prompt in enumerate([PROMPT, OTHER]):
            loc = prompt.locate(llama)
            with torch.no_grad():  # the plain reference: Hugging Face hidden states and logits, W and b by hand
                out = llama.model(torch.tensor([loc.prompt_ids]), output_hidden_states=True)
                s = out.hidden_states[1 + 1][0, loc.subject].float()  # entry ℓ + 1 is block ℓ's output
                f = beta * (lre.weight @ s) + lre.bias
                predicted = int(llama.adapter.decode(f[None]).argmax())
            assert got.predicted[k] == predicted
            assert got.wanted[k] == int(out.logits[0, -1].argmax())
            assert got.hits[k] == (predicted == got.wanted[k])


def test_lre_causality_adds_the_inverted_difference_at_the_subject(llama) -> None:  # noqa: ANN001
    from patchscopes.relations.lre_measures import lre_causality

    lre = estimate_lre(llama, [PROMPT, OTHER], subject_layer=1, object_layer=-1, aggregation="first")
    got = lre_causality(llama, lre, [PROMPT], [OTHER], beta=2.0, rank=8)
    loc, loc_new = PROMPT.locate(llama), OTHER.locate(llama)
    with torch.no_grad():  # the plain reference: Δs = (2W)†(F(s') − F(s)) added by a forward hook on block 1
        states = [llama.model(torch.tensor([x.prompt_ids]), output_hidden_states=True).hidden_states[2][0, x.subject]
                  for x in (loc, loc_new)]  # fmt: skip
        delta = low_rank_pinv(2.0 * lre.weight, 8) @ (2.0 * lre.weight @ (states[1] - states[0]).float())

        def add(module, args, output):  # noqa: ANN001, ANN202, ARG001
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[0, loc.subject] += delta.to(hidden.dtype)
            return output

        handle = llama.adapter.blocks[1].register_forward_hook(add)
        try:
            logits = llama.model(torch.tensor([loc.prompt_ids])).logits[0, -1]
        finally:
            handle.remove()
    assert got.predicted == [int(logits.argmax())]
    assert got.wanted == [RelationPrompt("capital", "France", "Rome", PROMPT.text).locate(llama).answer_ids[0]]
    with pytest.raises(LreError, match="already has"):
        lre_causality(llama, lre, [PROMPT], [PROMPT])
