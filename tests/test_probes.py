"""Load-time probes, discovery of the layout, and the fast engine's self-check and fallback, on real
(tiny, random-weight) transformers models."""

from __future__ import annotations

import warnings

import pytest

from arch_coverage import build
from patchscopes import TOKEN_IDENTITY, sweep
from patchscopes.errors import EngineError, ModelCheckError, PatchscopesWarning
from patchscopes.models.adapters import ARCHITECTURES, ArchSpec
from patchscopes.models.loading import from_model
from patchscopes.models.probes import probe, report_of
from tiny import MLLAMA_BLOCKS_SKIP_THEMSELVES, tiny_model, tiny_tokenizer


def test_every_tiny_model_is_probed_and_discovered():
    lm = tiny_model("llama")
    report = report_of(lm.model)
    assert report is not None and report.logit_lens_diff <= 1e-4 and report.identity_diff == 0.0
    assert lm.adapter.spec.blocks == "model.layers" and lm.adapter.spec.final_norm == "model.norm"
    assert "llama" not in ARCHITECTURES  # discovered, not listed
    assert probe(lm) is report  # cached per model object


def test_wrong_final_norm_is_repaired_or_refused():
    model = tiny_model("qwen2").model
    # a hand-given wrong head path is refused with the probe, the model type and the difference
    wrong = ArchSpec(blocks="model.layers", final_norm=None, unembed="model.embed_tokens", embed="model.embed_tokens")
    with pytest.raises(ModelCheckError, match=r"qwen2: the last-layer logit lens .* tolerance"):
        from_model(model, tiny_tokenizer(), adapter=wrong)
    # a missing final norm is found by the probe among the candidates
    lm = from_model(model, tiny_tokenizer(), adapter=ArchSpec("model.layers", None, "lm_head", "model.embed_tokens"))
    assert lm.adapter.spec.final_norm == "model.norm"


def test_unreadable_head_is_a_clear_error_and_check_false_loads():
    model = build("electra")  # its generator head transforms the state in a sibling module
    with pytest.raises(ModelCheckError, match="electra: the last-layer logit lens does not give the model's logits"):
        from_model(model, tiny_tokenizer())
    assert from_model(model, tiny_tokenizer(), check=False).n_layers == 4


def test_fast_engine_falls_back_with_one_warning_and_fast_raises():
    lm = from_model(build("mamba"), tiny_tokenizer(), name="tiny-mamba")  # no attention KV cache to replay
    texts = ["Diana, Princess of Wales", "cat"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = sweep(lm, texts, TOKEN_IDENTITY, progress=False)
        again = sweep(lm, texts, TOKEN_IDENTITY, progress=False)
    ours = [w for w in caught if issubclass(w.category, PatchscopesWarning)]
    assert len(ours) == 1 and "using the plain engine" in str(ours[0].message)
    assert "\n" not in str(ours[0].message)
    plain = sweep(lm, texts, TOKEN_IDENTITY, executor="plain", progress=False)
    assert list(auto.top1) == list(plain.top1) == list(again.top1)
    with pytest.raises(EngineError, match="fast engine cannot run tiny-mamba exactly"):
        sweep(lm, texts, TOKEN_IDENTITY, executor="fast", progress=False)


def test_fast_engine_rejects_an_embeddings_patch_instead_of_running_plain():
    lm = tiny_model("llama")
    with pytest.raises(EngineError, match="embeddings"):
        sweep(lm, ["cat"], TOKEN_IDENTITY, source_layers=[0], target_layers=["embeddings"], executor="fast", progress=False)


def test_capabilities_record_the_layout_and_the_engine_verdicts():
    from patchscopes.capabilities import capabilities

    llama = capabilities(tiny_model("llama"))
    assert llama.fast_engine and llama.edge_attribution and llama.blocks == "model.layers"
    gemma = capabilities(tiny_model("gemma3_text"))
    assert not gemma.edge_attribution  # norms after the sublayers
    mamba = capabilities(from_model(build("mamba"), tiny_tokenizer(), name="tiny-mamba"))
    assert not mamba.fast_engine and (mamba.fast_engine_problem or "").startswith("self-check")  # wording varies by release


def test_a_cancellation_during_the_self_check_is_not_taken_as_an_engine_failure():
    import copy

    from patchscopes.errors import SpecError

    base = tiny_model("llama")
    lm = from_model(copy.deepcopy(base.model), base.tokenizer, name="fresh")

    def cancel(module, args):  # noqa: ANN001, ANN202 - the explorer cancels a job from a block hook like this
        raise SpecError("cancelled by the caller")

    handle = lm.adapter.blocks[0].register_forward_pre_hook(cancel)
    with pytest.raises(SpecError, match="cancelled"):
        sweep(lm, ["cat"], TOKEN_IDENTITY, progress=False)
    handle.remove()
    fast = sweep(lm, ["cat"], TOKEN_IDENTITY, executor="fast", progress=False)  # the verdict was not cached as a failure
    assert len(fast) == lm.n_layers


@MLLAMA_BLOCKS_SKIP_THEMSELVES
def test_a_block_that_does_not_run_is_an_error_not_an_unpatched_answer():
    """Mllama's cross-attention blocks skip themselves on text-only input: reading or writing there must fail."""
    from patchscopes import ENTITY_DESCRIPTION, run_many
    from patchscopes.errors import LayerError

    lm = from_model(build("mllama"), tiny_tokenizer(), name="tiny-mllama")  # block 1 is a cross-attention block
    with pytest.raises(LayerError, match=r"block\(s\) \[1\] did not run"):
        sweep(lm, ["cat"], TOKEN_IDENTITY, source_layers=[1], progress=False)
    for engine in ("plain", "auto"):
        with pytest.raises(LayerError, match=r"block\(s\) \[1\] did not run"):
            run_many([ENTITY_DESCRIPTION.scope("Diana", layer=0, target_layer=1)], lm, executor=engine)
    assert run_many([ENTITY_DESCRIPTION.scope("Diana", layer=0, target_layer=2)], lm)[0].text is not None
