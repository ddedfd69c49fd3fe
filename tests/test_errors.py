"""Each bad input gets its own clear error (a project exception naming the value and the fix)."""

from __future__ import annotations

import pytest

from patchscopes import (
    ENTITY_DESCRIPTION,
    LayerError,
    MappingError,
    Patchscope,
    Placeholder,
    PositionError,
    PromptError,
    Source,
    SpecError,
    Target,
    UnknownArchitectureError,
    UnknownModelError,
    from_model,
    load_model,
    run,
)
from tiny import tiny_model, tiny_tokenizer


def test_layer_out_of_range():
    lm = tiny_model("llama")
    with pytest.raises(LayerError, match=r"layer 7 is out of range for a model with 4 blocks; valid: 0..3"):
        run(ENTITY_DESCRIPTION.scope("Diana", layer=7), lm)
    with pytest.raises(LayerError, match="layer -5"):
        run(Patchscope(Source("Diana", layer=1), Target("cat x", layer=-5, position=Placeholder())), lm)


def test_position_out_of_range():
    lm = tiny_model("llama")
    with pytest.raises(PositionError, match="position 40 is outside the prompt 'Diana'"):
        run(ENTITY_DESCRIPTION.scope("Diana", layer=1, position=40), lm)


def test_placeholder_missing():
    lm = tiny_model("llama")
    with pytest.raises(PositionError, match="placeholder 'x' not found"):
        run(Patchscope(Source("Diana", layer=1), Target("no marker here", layer=1, position=Placeholder("x"))), lm)


def test_hidden_size_mismatch_without_mapping():
    small, wide = tiny_model("llama"), tiny_model("llama", hidden=48)
    scope = Patchscope(Source("Diana", layer=1), Target("cat -> cat\n?", layer=1))
    with pytest.raises(MappingError, match="incompatible hidden sizes: .* 32, .* 48"):
        run(scope, small, target_model=wide)


def test_mapping_output_size_checked():
    lm = tiny_model("llama")
    scope = Patchscope(Source("Diana", layer=1), Target("cat -> cat\n?", layer=1), mapping=lambda h: h[..., :10])
    with pytest.raises(MappingError, match="returns size 10"):
        run(scope, lm)


def test_unknown_model_lists_known_ones(tmp_path):
    with pytest.raises(UnknownModelError, match="SmolLM2-135M"):
        load_model("definitely-not-a-model-xyz")
    with pytest.raises(UnknownModelError, match="not an existing directory"):
        load_model("some path with spaces")


def test_empty_prompt():
    lm = tiny_model("llama")
    with pytest.raises(PromptError, match="empty prompt"):
        run(ENTITY_DESCRIPTION.scope("   ", layer=1), lm)


def test_bad_mode_and_multi_position_mismatch():
    lm = tiny_model("llama")
    with pytest.raises(SpecError, match="mode"):
        Patchscope(Source("Diana", layer=1), Target("x", layer=1), mode="multiply")  # type: ignore[arg-type]
    scope = Patchscope(Source("Diana, Princess", layer=1, position=[0, 1]), Target("cat x", layer=1, position=Placeholder()))
    with pytest.raises(SpecError, match="2 source position"):
        run(scope, lm)


def test_unknown_architecture():
    import torch

    class Weird(torch.nn.Module):
        config = type("C", (), {"model_type": "weird"})()

    with pytest.raises(UnknownArchitectureError, match="ArchSpec"):
        from_model(Weird(), tiny_tokenizer())
