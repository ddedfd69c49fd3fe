"""Chat templates on the target side: positions after templating, one BOS, the raw default unchanged, the
error without a template, and a templated entity description on the real default model (API and CLI)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from tokenizers import processors
from typer.testing import CliRunner

from patchscopes import (
    ENTITY_DESCRIPTION,
    LOGIT_LENS,
    Generate,
    NextToken,
    Patchscope,
    PatchscopeError,
    Placeholder,
    Source,
    SpecError,
    Target,
    custom,
    from_model,
    run,
    sweep,
)
from patchscopes.capture import capture
from patchscopes.chat import has_chat_template, target_text
from patchscopes.cli import app
from patchscopes.errors import ChatTemplateError
from patchscopes.patching import Patch, PatchedRun, run_patched
from patchscopes.rows import COLUMNS
from patchscopes.scope import SAME
from tiny import tiny_model, tiny_tokenizer

TEMPLATE = "{{ bos_token }}<|user|>\n{{ messages[0]['content'] }}\n<|assistant|>\n"
PROMPT = "The official currency of x"
runner = CliRunner()


def chat_model(template: str = TEMPLATE):  # noqa: ANN201
    """The tiny llama with a copy of its tokenizer that adds a BOS (id 1) and has ``template`` as chat template."""
    tok = copy.deepcopy(tiny_tokenizer())
    tok.bos_token = "<eos>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    tok.chat_template = template
    return from_model(tiny_model("llama").model, tok, name="tiny-llama-chat", check=False)


def scope(chat: object = False, position: object = None, decoding: object = None) -> Patchscope:
    target = Target(PROMPT, layer=2, position=Placeholder("x") if position is None else position, chat=chat)  # type: ignore[arg-type]
    return Patchscope(Source("Diana, Princess of Wales", layer=2), target, decoding=decoding or NextToken())  # type: ignore[arg-type]


def manual(lm, ids: list[int], position: int, max_new_tokens: int = 0):  # noqa: ANN001, ANN201
    """The same Patchscope by hand: the source's last-token state at layer 2, written at ``position`` of ``ids``."""
    src = lm.tokenize("Diana, Princess of Wales").ids
    state = capture(lm, [src], [[len(src) - 1]], [2])[0][0]
    return run_patched(lm, [PatchedRun(ids, [Patch(2, [position], state)])], max_new_tokens=max_new_tokens)[0]


def test_placeholder_is_found_after_templating_and_bos_is_not_doubled():
    lm = chat_model()
    raw, templated = target_text(lm, PROMPT, False), target_text(lm, PROMPT, True)
    assert templated.chat and not raw.chat
    assert templated.text == f"<eos><|user|>\n{PROMPT}\n<|assistant|>"
    (pos,) = templated.resolve(Placeholder("x"))
    (raw_pos,) = raw.resolve(Placeholder("x"))
    assert lm.tokenizer.decode([templated.ids[pos]]) == " x" == lm.tokenizer.decode([raw.ids[raw_pos]])
    prefix = len(lm.tokenizer("<eos><|user|>\n", add_special_tokens=False).input_ids)
    assert pos == raw_pos - 1 + prefix  # the raw ids start with the tokenizer's own BOS; the templated ones with the template's
    assert templated.resolve(-1) == [len(templated.ids) - 1] and templated.resolve(0) == [0]
    assert templated.ids.count(1) == 1 and templated.ids[0] == 1  # one BOS, the template's
    assert lm.tokenizer(templated.text).input_ids[:2] == [1, 1]  # what tokenising it with special tokens would do


def test_a_templated_run_patches_the_placeholder_of_the_templated_ids():
    lm = chat_model()
    templated = target_text(lm, PROMPT, True)
    (pos,) = templated.resolve(Placeholder("x"))
    result = run(scope(chat=True, decoding=Generate(max_new_tokens=4)), lm)
    assert result.target_positions == [pos]
    assert result.chat_text == templated.text
    expected = manual(lm, templated.ids, pos, max_new_tokens=4)
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert result.generated_ids == expected.generated
    unpatched = run_patched(lm, [PatchedRun(templated.ids)])[0]
    assert not torch.allclose(result.logits, unpatched.logits, atol=1e-4)  # the patch landed


def test_chat_false_is_the_raw_behaviour_exactly():
    lm = chat_model()  # it has a template: False must still ignore it
    default, off = run(scope(), lm), run(scope(chat=False), lm)
    raw = lm.tokenize(PROMPT)
    (raw_pos,) = target_text(lm, PROMPT, False).resolve(Placeholder("x"))
    assert default.target_positions == off.target_positions == [raw_pos]
    assert torch.equal(default.logits, off.logits)
    torch.testing.assert_close(off.logits, manual(lm, raw.ids, raw_pos).logits, atol=1e-5, rtol=1e-5)
    assert off.chat_text is None
    assert "chat" not in scope().to_dict()["target"]  # a raw target's JSON is unchanged
    df = sweep(lm, ["Diana"], custom(PROMPT), source_layers=[1], progress=False)
    assert list(df.columns) == COLUMNS


def test_auto_follows_the_tokenizer():
    with_template, without = chat_model(), tiny_model("llama")
    assert has_chat_template(with_template.tokenizer) and not has_chat_template(without.tokenizer)
    assert torch.equal(run(scope(chat="auto"), with_template).logits, run(scope(chat=True), with_template).logits)
    assert torch.equal(run(scope(chat="auto"), without).logits, run(scope(chat=False), without).logits)
    df = sweep(without, ["Diana"], custom(PROMPT, chat="auto"), source_layers=[1], progress=False)
    assert df.target_chat.tolist() == [False] and df.target_text.tolist() == [PROMPT]


def test_rows_record_the_templated_target():
    lm = chat_model()
    df = sweep(lm, ["Diana", "Paris"], custom(PROMPT, chat=True), source_layers=[1, 3], progress=False)
    assert df.target_chat.all() and df.target_prompt.eq(PROMPT).all()
    assert df.target_text.eq(target_text(lm, PROMPT, True).text).all()
    assert Patchscope.from_json(scope(chat=True).to_json()).target.chat is True
    assert Patchscope.from_json(scope(chat="auto").to_json()).target.chat == "auto"


def test_the_placeholder_is_looked_for_in_the_users_text_only():
    lm = chat_model("<|user|>\n{{ messages[0]['content'] }}\nx marks the answer: ")
    templated = target_text(lm, PROMPT, True)
    assert templated.text.count(" x") == 1 and templated.text.count("\nx ") == 1  # the template holds an 'x' of its own
    (pos,) = templated.resolve(Placeholder("x"))
    assert templated.offsets[pos][1] == templated.start + len(PROMPT)  # the user's x, not the template's later one


def test_chat_true_without_a_template_names_the_model_and_the_fix():
    lm = tiny_model("llama")
    with pytest.raises(ChatTemplateError, match=r"tiny-llama.*no chat template.*chat=False.*tokenizer\.chat_template") as info:
        run(scope(chat=True), lm)
    assert isinstance(info.value, PatchscopeError)


def test_bad_chat_values_and_targets_without_their_own_prompt():
    with pytest.raises(SpecError, match="chat must be True, False or 'auto', not 'yes'"):
        Target(PROMPT, position=Placeholder(), chat="yes")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="target position 'same'.*chat template shifts"):
        run(Patchscope(Source("Diana", layer=1), Target(None, layer=1, position=SAME, chat=True)), chat_model())
    with pytest.raises(SpecError, match="no target prompt of its own"):
        LOGIT_LENS.with_chat(True)
    assert LOGIT_LENS.with_chat("auto") is LOGIT_LENS
    assert ENTITY_DESCRIPTION.with_chat("auto").scope("Diana", layer=1).target.chat == "auto"


def test_cli_refuses_a_bad_chat_value():
    result = runner.invoke(app, ["inspect", "Diana", "--chat", "maybe"])
    assert result.exit_code == 2 and "--chat takes auto, true or false, not 'maybe'" in result.output


@pytest.mark.real
def test_templated_entity_description_on_the_default_model(smol):  # noqa: ANN001
    assert has_chat_template(smol.tokenizer)
    preset = ENTITY_DESCRIPTION.with_chat(True).with_decoding(Generate(max_new_tokens=10))
    df = sweep(smol, ["Diana, Princess of Wales"], preset, source_layers=[4, 8], progress=False)
    templated = target_text(smol, ENTITY_DESCRIPTION.target_prompt or "", True)
    assert df.target_chat.all() and df.target_text.eq(templated.text).all()
    text = templated.text
    assert f"<|im_start|>user\n{ENTITY_DESCRIPTION.target_prompt}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>") == 3
    assert templated.ids.count(smol.tokenizer.bos_token_id) == 3  # the template's markers, none added on top
    (pos,) = df.target_position.unique()
    assert smol.tokenizer.decode([templated.ids[pos]]) == " x"
    assert pos > len(smol.tokenize(ENTITY_DESCRIPTION.target_prompt or "").ids)  # shifted by the system turn
    assert all(t.strip() for t in df.text)
    raw = sweep(smol, ["Diana, Princess of Wales"], preset.with_chat(False), source_layers=[4], progress=False)
    assert list(raw.columns) == COLUMNS and raw.text[0] != df.text[0]


@pytest.mark.real
def test_cli_inspect_with_chat_on_the_default_model(smol, tmp_path):  # noqa: ANN001
    out = tmp_path / "chat.csv"
    args = ["inspect", "Diana, Princess of Wales", "--preset", "entity-description", "--layers", "6", "--max-new-tokens", "8"]
    result = runner.invoke(app, [*args, "--chat", "true", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    assert df.target_chat.tolist() == [True]
    assert "<|im_start|>user\n" in df.target_text[0] and df.target_text[0].endswith("<|im_start|>assistant\n")
    assert isinstance(df.text[0], str) and df.text[0].strip()
    raw = runner.invoke(app, [*args, "--csv", str(tmp_path / "raw.csv")])
    assert raw.exit_code == 0, raw.output
    assert "target_chat" not in pd.read_csv(tmp_path / "raw.csv").columns
