"""One real request on SmolLM2-135M: the explorer's logit lens at the last layer equals the model's own
next-token distribution computed with plain transformers."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from patchscopes.server import create_app

PROMPT = "The capital of France is"
pytestmark = pytest.mark.real


def test_logit_lens_last_layer_is_the_models_own_prediction(smol) -> None:  # noqa: ANN001
    api = TestClient(create_app(["SmolLM2-135M"], loader=lambda name: smol), raise_server_exceptions=False)
    tokens = api.post("/api/tokenize", json={"model": "SmolLM2-135M", "prompt": PROMPT}).json()["tokens"]
    assert "".join(t["text"] for t in tokens) == PROMPT
    out = api.post(
        "/api/inspect",
        json={"model": "SmolLM2-135M", "prompt": PROMPT, "preset": "logit-lens", "source_layers": "-1", "answer": " Paris"},
    )
    assert out.status_code == 200, out.text
    (row,) = out.json()["rows"]
    ids = torch.tensor([smol.tokenize(PROMPT).ids])
    with torch.no_grad():
        probs = torch.softmax(smol.model(ids).logits[0, -1].float(), dim=-1)
    paris = smol.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert row["source_layer"] == row["target_layer"] == 29
    assert row["top1"] == " Paris" == smol.tokenizer.decode([int(probs.argmax())])
    assert row["top1_prob"] == row["answer_prob"]
    assert abs(row["answer_prob"] - float(probs[paris])) < 1e-4
