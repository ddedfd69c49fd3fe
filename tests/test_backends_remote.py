"""NDIF remote execution: key and hosted-model errors, and the requests built and validated offline.

Tests that talk to NDIF itself skip unless NDIF_API_KEY is set."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from patchscopes.backends.errors import BackendError, MissingAPIKeyError, ModelNotHostedError
from patchscopes.positions import Placeholder
from patchscopes.runner import run_many as native_run_many
from patchscopes.scope import Generate, NextToken, Patchscope, Source, Target
from tiny import tiny_model

pytest.importorskip("nnsight")
from patchscopes.backends.ndif_requests import build_requests  # noqa: E402
from patchscopes.backends.nnsight_backend import run_many_nnsight, wrap  # noqa: E402
from patchscopes.backends.remote import (  # noqa: E402
    API_KEY_ENV,
    api_key,
    check_hosted,
    hosted_models,
    model_key,
    parse_model_key,
)

REPO = "HuggingFaceTB/SmolLM2-135M"
STATUS = {  # the shape of NDIF's raw /status answer
    "deployments": {
        "a": {"repo_id": REPO, "application_state": "RUNNING", "deployment_level": "HOT"},
        "b": {"repo_id": "meta-llama/Llama-3.1-70B", "application_state": "DEPLOYING", "deployment_level": "WARM"},
    }
}


def run_many(scopes, model, target_model=None, batch_size=16):  # noqa: ANN001, ANN201
    """The native engine's plain padded-batch path (the reference this backend mirrors), on any core version."""
    if "executor" in inspect.signature(native_run_many).parameters:
        return native_run_many(scopes, model, target_model, batch_size=batch_size, executor="plain")
    return native_run_many(scopes, model, target_model, batch_size=batch_size)


def _scopes() -> list[Patchscope]:
    target = Target("cat -> cat\n1135 -> 1135\nx", 1, Placeholder("x"))
    decodings = (NextToken(), Generate(4))
    return [Patchscope(Source("The capital of France is", layer), target, decoding=d) for layer in (0, 2) for d in decodings]


def test_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(MissingAPIKeyError, match=API_KEY_ENV):
        api_key()
    with pytest.raises(MissingAPIKeyError, match="login.ndif.us"):
        api_key({API_KEY_ENV: "   "})
    assert api_key({API_KEY_ENV: "k-123"}) == "k-123"
    # a remote run refuses before sending anything
    with pytest.raises(MissingAPIKeyError):
        run_many_nnsight(_scopes()[:1], tiny_model("llama"), remote=True)


def test_hosted_models_and_not_hosted_errors() -> None:
    hosted = hosted_models(STATUS)
    assert hosted == {REPO: "RUNNING", "meta-llama/Llama-3.1-70B": "DEPLOYING"}
    check_hosted(REPO, hosted)
    with pytest.raises(ModelNotHostedError, match="not hosted.*hosted models: .*SmolLM2"):
        check_hosted("my/private-model", hosted)
    with pytest.raises(ModelNotHostedError, match="DEPLOYING"):
        check_hosted("meta-llama/Llama-3.1-70B", hosted)
    with pytest.raises(ModelNotHostedError, match="none"):
        check_hosted(REPO, hosted_models({"deployments": {}}))


def test_model_key_matches_nnsight() -> None:
    """Our offline key is the one nnsight itself mints (its hub lookup replaced by the canonical id)."""
    import nnsight.modeling.huggingface as hf

    envoy = wrap(tiny_model("llama")).envoy
    saved = envoy.repo_id
    hf._ID_CACHE.setdefault(REPO, REPO)
    try:
        envoy.repo_id = REPO
        assert model_key(REPO) == envoy.to_model_key()
    finally:
        envoy.repo_id = saved
    assert parse_model_key(model_key(REPO, "v1"))["revision"] == "v1"
    for bad in ("no-colon", "other.Class:{}", 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "x"}'):
        with pytest.raises(BackendError):
            parse_model_key(bad)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_requests_built_and_validated_offline(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    lm = tiny_model(arch)
    plan = build_requests(_scopes(), lm, REPO, batch_size=4)
    # one source-capture request, then one patched-decode request per decoding
    assert [r.kind for r in plan.requests] == ["source", "target", "target"]
    for request in plan.requests:
        assert request.envelope["model_key"] == model_key(REPO)
        assert request.envelope["env"]["attn_implementation"] == lm.model.config._attn_implementation
        assert request.size > 0
    plan.validate(hosted=hosted_models(STATUS))
    with pytest.raises(ModelNotHostedError):
        plan.validate(hosted=["someone/else"])
    with pytest.raises(MissingAPIKeyError):
        plan.validate(require_key=True)
    # the deserialised requests, run on the stand-in, give the native engine's results
    for a, b in zip(run_many(_scopes(), lm, batch_size=4), plan.results):
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        assert b.generated_ids == a.generated_ids


def test_requests_ship_only_what_the_block_uses() -> None:
    """Regression: the decode block named the wrapper, so each target request shipped it by value with its
    recording backend and every request recorded so far (payloads grew with each batch), and its copy replaced
    the recorder: the generation request went unrecorded once installed packages stayed visible."""
    plan = build_requests(_scopes(), tiny_model("llama"), REPO, batch_size=4)
    targets = [r for r in plan.requests if r.kind == "target"]
    for request in plan.requests:
        for name in (b"NNsightModel", b"RequestPlan", b"RecordingBackend"):
            assert name not in request.payload, (request.kind, name)
    assert targets[0].size == targets[1].size  # the same block for both decodings: nothing accumulates


def test_building_requests_leaves_installed_packages_working(draw_constrained_figure) -> None:  # noqa: ANN001
    """Regression: the recorder hid matplotlib and kiwisolver while deserialising, and every constrained-layout
    figure drawn later in the process raised kiwisolver's TypeError (CI's evals failures)."""
    draw_constrained_figure()
    build_requests(_scopes()[:2], tiny_model("llama"), REPO)
    draw_constrained_figure()


def test_payload_deserialises_on_its_own() -> None:
    """A recorded payload is a complete request: nnsight's server-side deserialiser rebuilds the block."""
    from nnsight.schema.request import RequestModel

    lm = tiny_model("llama")
    plan = build_requests(_scopes()[:1], lm, REPO)
    envoy = wrap(lm).envoy
    for request in plan.requests:
        tracer = RequestModel.deserialize(request.payload, envoy._remoteable_persistent_objects(), compress=False)
        assert tracer.info.code is not None


NO_KEY = f"remote NDIF tests need an API key in {API_KEY_ENV} and network access"


@pytest.mark.skipif(not os.environ.get(API_KEY_ENV), reason=NO_KEY)
def test_ndif_gpt2_token_identity() -> None:  # pragma: no cover - needs NDIF
    from patchscopes.backends.remote import ndif_model
    from patchscopes.presets import TOKEN_IDENTITY

    remote = ndif_model("openai-community/gpt2")
    [result] = run_many_nnsight([TOKEN_IDENTITY.scope("Diana, Princess of Wales", layer=3, position=-1)], remote)
    assert result.top_tokens


def test_cli_ndif_check_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from patchscopes.cli import app

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    result = CliRunner().invoke(app, ["ndif-check", "meta-llama/Llama-3.1-70B"])
    assert result.exit_code == 2
    assert API_KEY_ENV in result.output


def test_cli_layer_lists() -> None:
    import typer

    from patchscopes.backends.cli import _layers

    assert _layers("all") is None
    assert _layers("0-9:3,20") == [0, 3, 6, 9, 20]
    with pytest.raises(typer.BadParameter, match="non-negative"):
        _layers("-1")


def test_preflight_before_a_remote_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import nnsight

    from patchscopes.backends.remote import check_remote_ready

    nm = wrap(tiny_model("llama"))
    monkeypatch.setenv(API_KEY_ENV, "k-1")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(ModelNotHostedError, match="other/model"):
        check_remote_ready(nm, hosted={"other/model": "RUNNING"})
    check_remote_ready(nm, hosted={nm.name: "RUNNING"})
    assert nnsight.CONFIG.API.APIKEY == "k-1"  # handed to nnsight for the request


def test_hosted_model_handle_is_built_without_weights(smol) -> None:  # noqa: ANN001
    """``ndif_model`` builds the structure on the meta device: the handle tokenizes and resolves layers."""
    from patchscopes.backends.remote import ndif_model

    nm = ndif_model(smol.source, check=False)
    assert nm.remote is True
    assert nm.handle.device.type == "meta"
    assert (nm.handle.n_layers, nm.handle.hidden_size) == (smol.n_layers, smol.hidden_size)
    assert nm.handle.tokenize("Diana, Princess of Wales").ids == smol.tokenize("Diana, Princess of Wales").ids


def test_unreachable_ndif_is_an_error_not_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import nnsight

    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(BackendError, match="could not reach NDIF at http://127.0.0.1:9"):
        hosted_models()
