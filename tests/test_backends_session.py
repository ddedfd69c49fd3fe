"""One nnsight request per batch (capture, mapping, patched decoding in one session) equals the native engine."""

from __future__ import annotations

import inspect

import pytest
import torch

from patchscopes.backends.errors import BackendError
from patchscopes.mappings import AffineMap
from patchscopes.positions import Placeholder
from patchscopes.runner import run_many as native_run_many
from patchscopes.scope import Generate, NextToken, Patchscope, Source, Target
from tiny import tiny_model

pytest.importorskip("nnsight")
from patchscopes.backends.nnsight_backend import run_many_session  # noqa: E402

TARGET = "cat -> cat\n1135 -> 1135\nhello -> hello\nx"


def run_many(scopes, model, batch_size=16):  # noqa: ANN001, ANN201
    """The native engine's plain padded-batch path, on any core version."""
    if "executor" in inspect.signature(native_run_many).parameters:
        return native_run_many(scopes, model, batch_size=batch_size, executor="plain")
    return native_run_many(scopes, model, batch_size=batch_size)


def _scopes(lm, decoding) -> list[Patchscope]:  # noqa: ANN001
    torch.manual_seed(0)
    d = lm.hidden_size
    amap = AffineMap(torch.eye(d) + 0.05 * torch.randn(d, d), 0.1 * torch.randn(d), {})
    out = []
    for sl, tl, mapping in [(1, 2, None), ("embeddings", 0, amap), (3, "same", None), (2, "embeddings", amap)]:
        target = Target(TARGET, tl, Placeholder("x"))
        out.append(Patchscope(Source("The capital of France is", sl), target, mapping=mapping, decoding=decoding))
        out.append(Patchscope(Source("Diana, Princess of Wales", sl, -2), Target(None, 1, -1), mode="add", decoding=decoding))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("remote", [False, "local"])
def test_one_request_per_batch_equals_native(arch: str, remote) -> None:  # noqa: ANN001
    lm = tiny_model(arch)
    scopes = _scopes(lm, NextToken()) + _scopes(lm, Generate(max_new_tokens=4))
    native = run_many(scopes, lm, batch_size=5)
    got = run_many_session(scopes, lm, batch_size=5, remote=remote)
    for a, b in zip(native, got, strict=True):
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        assert (b.top_ids, b.generated_ids, b.text) == (a.top_ids, a.generated_ids, a.text)


def test_one_request_per_batch_is_recorded_as_one_request() -> None:
    from patchscopes.backends.ndif_requests import RequestPlan, recorder
    from patchscopes.backends.nnsight_backend import NNsightModel, wrap
    from patchscopes.backends.remote import model_key

    lm = tiny_model("llama")
    plan = RequestPlan(host="offline", has_key=False)
    base = wrap(lm)
    nm = NNsightModel(lm, base.envoy, backend=recorder(plan, model_key("HuggingFaceTB/SmolLM2-135M")))
    scopes = _scopes(lm, NextToken())[:4]
    run_many_session(scopes, nm, batch_size=4)
    assert [r.kind for r in plan.requests] == ["session"]


def test_client_side_mappings_are_refused() -> None:
    lm = tiny_model("llama")
    scope = Patchscope(Source("The capital of France is", 1), Target(TARGET, 1, Placeholder("x")), mapping=lambda h: 2 * h)
    with pytest.raises(BackendError, match="identity or an AffineMap"):
        run_many_session([scope], lm)
