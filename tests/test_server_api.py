"""API tests of the explorer on tiny random models: every endpoint, every kind of bad input, and the rows
checked against the library called directly."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from patchscopes.mappings import AffineMap
from patchscopes.positions import Placeholder
from patchscopes.presets import custom
from patchscopes.runner import run
from patchscopes.scope import Generate, NextToken, Patchscope, Source, Target
from patchscopes.server import Limits, create_app
from patchscopes.sweep import sweep
from tiny import tiny_model

MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
PROMPT = "The capital of France is Paris"


def loader(name: str):  # noqa: ANN201
    return tiny_model(MODELS[name])


def client(limits: Limits | None = None, maps=(), allowed=("tiny-llama",)) -> TestClient:  # noqa: ANN001
    return TestClient(create_app(list(allowed), loader=loader, maps=maps, limits=limits), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def api() -> TestClient:
    return client()


def body(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"model": "tiny-llama", "prompt": PROMPT, "preset": "custom", "target_prompt": "cat -> x"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_health_models_and_openapi(api: TestClient) -> None:
    health = api.get("/api/health").json()
    assert health["status"] == "ok" and health["queue"]["capacity"] == Limits().queue_capacity
    info = api.get("/api/models").json()
    assert info["models"] == [{"name": "tiny-llama", "n_layers": 4, "hidden_size": 32, "loaded": True}]
    assert set(info["presets"]) == {"token-identity", "entity-description", "attribute", "custom", "logit-lens"}
    assert info["limits"]["max_prompt_chars"] == 400
    paths = api.get("/openapi.json").json()["paths"]
    for path in ["/api/health", "/api/models", "/api/tokenize", "/api/inspect", "/api/inspect/stream", "/api/results/{rid}"]:
        assert path in paths
    assert api.get("/docs").status_code == 200


def test_page_and_static_files(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and 'id="heatmap"' in page.text and "/static/app.js" in page.text
    assert api.get("/static/app.js").status_code == 200
    assert api.get("/static/style.css").status_code == 200


def test_tokenize_matches_the_tokenizer(api: TestClient) -> None:
    lm = tiny_model("llama")
    out = api.post("/api/tokenize", json={"model": "tiny-llama", "prompt": PROMPT}).json()
    expected = lm.tokenize(PROMPT)
    assert [t["id"] for t in out["tokens"]] == expected.ids
    assert [(t["start"], t["end"]) for t in out["tokens"]] == [tuple(o) for o in expected.offsets]
    assert "".join(t["text"] for t in out["tokens"]) == PROMPT


def test_inspect_grid_equals_the_library(api: TestClient) -> None:
    lm = tiny_model("llama")
    response = api.post("/api/inspect", json=body(source_layers="0-3", target_layers="1,3", position=2, max_new_tokens=3))
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["plan"]["grid"] and out["plan"]["cells"] == 8 and out["plan"]["position"] == 2
    preset = custom("cat -> x", decoding=Generate(max_new_tokens=3, top_k=5))
    ref = sweep(lm, [PROMPT], preset, source_layers=[0, 1, 2, 3], target_layers=[1, 3], position=2, progress=False)
    got = sorted(out["rows"], key=lambda r: (r["source_layer"], r["target_layer"]))
    ref_rows = ref.sort_values(["source_layer", "target_layer"]).to_dict("records")
    assert [(r["source_layer"], r["target_layer"]) for r in got] == [(r["source_layer"], r["target_layer"]) for r in ref_rows]
    for g, r in zip(got, ref_rows):
        assert g["text"] == r["text"] and g["top_tokens"] == list(r["top_tokens"])
        assert g["top1_prob"] == pytest.approx(r["top1_prob"], abs=1e-5)


def test_answer_probability_equals_softmax_of_the_patched_logits(api: TestClient) -> None:
    lm = tiny_model("llama")
    out = api.post("/api/inspect", json=body(source_layers="2", answer=" Paris")).json()
    answer_id = lm.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    scope = Patchscope(Source(PROMPT, layer=2), Target("cat -> x", layer=2, position=Placeholder("x")), decoding=NextToken())
    expected = float(torch.softmax(run(scope, lm).logits.float(), -1)[answer_id])
    assert out["plan"]["answer_token"] == lm.token_strings([answer_id])[0]
    assert out["rows"][0]["answer_prob"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("preset", ["token-identity", "logit-lens"])
def test_fixed_presets(api: TestClient, preset: str) -> None:
    out = api.post("/api/inspect", json=body(preset=preset, target_prompt=None, source_layers="all")).json()
    assert len(out["rows"]) == 4
    targets = {r["target_layer"] for r in out["rows"]}
    assert targets == ({3} if preset == "logit-lens" else {0, 1, 2, 3})


def test_stream_events_and_exports(api: TestClient) -> None:
    with api.stream("POST", "/api/inspect/stream", json=body(source_layers="all", target_layers="all")) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in response.iter_lines() if line]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done" and "rows" in kinds
    rows = [r for e in events if e["type"] == "rows" for r in e["rows"]]
    assert len(rows) == 16 and events[-1]["rows"] == 16
    rid = events[-1]["result_id"]
    stored = api.get(f"/api/results/{rid}").json()
    assert stored["rows"] == rows
    csv = api.get(f"/api/results/{rid}/csv")
    assert csv.headers["content-type"].startswith("text/csv") and len(csv.text.strip().splitlines()) == 17
    assert csv.text.splitlines()[0].startswith("model,target_model,preset,prompt")
    png = api.get(f"/api/results/{rid}/png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_of_a_layer_table_and_of_answer_probabilities(api: TestClient) -> None:
    rid = api.post("/api/inspect", json=body(source_layers="0,1", answer=" Paris")).json()["result_id"]
    assert api.get(f"/api/results/{rid}/png").content[:4] == b"\x89PNG"
    assert api.get(f"/api/results/{rid}/png?value=answer_prob").content[:4] == b"\x89PNG"
    plain = api.post("/api/inspect", json=body(source_layers="0")).json()["result_id"]
    bad = api.get(f"/api/results/{plain}/png?value=answer_prob")
    assert bad.status_code == 400 and "answer" in bad.json()["message"]


def test_result_store_is_bounded() -> None:
    api = client(Limits(max_results=2))
    ids = [api.post("/api/inspect", json=body(source_layers=str(i))).json()["result_id"] for i in range(3)]
    assert api.get(f"/api/results/{ids[0]}").status_code == 404
    assert api.get(f"/api/results/{ids[2]}").status_code == 200


def test_a_repeated_request_is_answered_from_the_store() -> None:
    api = client()
    first = api.post("/api/inspect", json=body(source_layers="1,2")).json()
    again = api.post("/api/inspect", json=body(source_layers="1,2")).json()
    assert again["cached"] and again["result_id"] == first["result_id"] and again["rows"] == first["rows"]
    with api.stream("POST", "/api/inspect/stream", json=body(source_layers="1,2")) as response:
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert [e["type"] for e in events] == ["queued", "started", "rows", "done"]
    assert events[2]["rows"] == first["rows"] and events[-1]["result_id"] == first["result_id"]
    assert api.get("/api/health").json()["queue"]["submitted"] == 1
    other = api.post("/api/inspect", json=body(source_layers="1,2", answer=" Paris")).json()
    assert "cached" not in other and other["result_id"] != first["result_id"]


def _map(source_layer: int | None = None, target_layer: int | None = None) -> AffineMap:
    torch.manual_seed(0)
    meta = {"source_model": "tiny-llama", "target_model": "tiny-qwen2"}
    if source_layer is not None:
        meta.update(source_layer=source_layer, target_layer=target_layer)
    return AffineMap(torch.eye(32) + 0.01 * torch.randn(32, 32), torch.zeros(32), meta)


def test_cross_model_with_a_fitted_map_equals_the_library() -> None:
    amap = _map()
    api = client(maps=[amap], allowed=("tiny-llama", "tiny-qwen2"))
    info = api.get("/api/models").json()
    assert info["maps"] == [{"source": "tiny-llama", "target": "tiny-qwen2", "layers": "any"}]
    out = api.post("/api/inspect", json=body(target_model="tiny-qwen2", source_layers="1,2"))
    assert out.status_code == 200, out.text
    ref = sweep(
        tiny_model("llama"),
        [PROMPT],
        custom("cat -> x", decoding=NextToken(top_k=5)),
        source_layers=[1, 2],
        mapping=amap,
        target_model=tiny_model("qwen2"),
        progress=False,
    )
    assert [r["top1"] for r in out.json()["rows"]] == list(ref["top1"])
    assert [r["top1_prob"] for r in out.json()["rows"]] == pytest.approx(list(ref["top1_prob"]), abs=1e-5)


def test_cross_model_layer_maps_and_missing_maps() -> None:
    api = client(maps=[_map(1, 2)], allowed=("tiny-llama", "tiny-qwen2"))
    assert api.get("/api/models").json()["maps"][0]["layers"] == [[1, 2]]
    ok = api.post("/api/inspect", json=body(target_model="tiny-qwen2", source_layers="1", target_layers="2"))
    assert ok.status_code == 200, ok.text
    missing = api.post("/api/inspect", json=body(target_model="tiny-qwen2", source_layers="1", target_layers="3"))
    assert missing.status_code == 422 and missing.json()["error"] == "no_map" and "1→2" in missing.json()["message"]
    backwards = api.post("/api/inspect", json=body(model="tiny-qwen2", target_model="tiny-llama", source_layers="1"))
    assert backwards.status_code == 422 and "--map" in backwards.json()["message"]
    lens = api.post("/api/inspect", json=body(target_model="tiny-qwen2", preset="logit-lens", target_prompt=None))
    assert lens.status_code == 422 and "source prompt" in lens.json()["message"]


BAD_INSPECT = [
    ({"model": "../models/evil"}, 422, "invalid_request", "model"),
    ({"model": "/etc/passwd"}, 422, "invalid_request", "model"),
    ({"model": "org/name"}, 422, "invalid_request", "model"),
    ({"model": "SmolLM2-135M"}, 400, "model_not_allowed", "allowed: tiny-llama"),
    ({"target_model": "tiny-gpt2"}, 400, "model_not_allowed", "tiny-gpt2"),
    ({"prompt": ""}, 422, "invalid_request", "prompt"),
    ({"prompt": "   "}, 422, "invalid_request", "blank"),
    ({"prompt": "a" * 401}, 422, "over_limit", "max_prompt_chars=400"),
    ({"position": 99}, 422, "invalid_request", "position 99"),
    ({"position": "last"}, 422, "invalid_request", "position"),
    ({"source_layers": "abc"}, 422, "bad_layers", "'abc'"),
    ({"source_layers": "0-99"}, 422, "bad_layers", "layer 99"),
    ({"source_layers": "3-1"}, 422, "bad_layers", "backwards"),
    ({"source_layers": "0-3:0"}, 422, "bad_layers", "step"),
    ({"target_layers": "7"}, 422, "bad_layers", "layer 7"),
    ({"max_new_tokens": 41}, 422, "over_limit", "max_new_tokens=40"),
    ({"max_new_tokens": -1}, 422, "invalid_request", "max_new_tokens"),
    ({"preset": "telepathy"}, 422, "invalid_request", "preset"),
    ({"target_prompt": None}, 422, "invalid_request", "needs target_prompt"),
    ({"target_prompt": "no placeholder here"}, 422, "invalid_request", "placeholder 'x' not found"),
    ({"target_prompt": "x " * 301}, 422, "over_limit", "max_target_prompt_chars"),
    ({"preset": "token-identity"}, 422, "invalid_request", "own target prompt"),
    ({"placeholder": ""}, 422, "invalid_request", "placeholder"),
    ({"answer": "y" * 65}, 422, "over_limit", "max_answer_chars"),
    ({"answer": ""}, 422, "invalid_request", "no tokens"),
    ({"unexpected": 1}, 422, "invalid_request", "unexpected"),
]


@pytest.mark.parametrize(("change", "status", "kind", "fragment"), BAD_INSPECT)
def test_bad_inspect_requests(api: TestClient, change: dict, status: int, kind: str, fragment: str) -> None:
    payload = body()
    for key, value in change.items():  # None removes the field
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    for path in ("/api/inspect", "/api/inspect/stream"):
        response = api.post(path, json=payload)
        assert response.status_code == status, (path, response.text)
        err = response.json()
        assert err["error"] == kind and fragment in err["message"], err
        assert "Traceback" not in response.text


def test_budget_limits() -> None:
    api = client(Limits(max_cells=8, max_generated_tokens=10))
    cells = api.post("/api/inspect", json=body(source_layers="all", target_layers="all"))
    assert cells.status_code == 422 and "max_cells=8" in cells.json()["message"]
    tokens = api.post("/api/inspect", json=body(source_layers="all", max_new_tokens=3))
    assert tokens.status_code == 422 and "max_generated_tokens=10" in tokens.json()["message"]


def test_malformed_bodies_and_routes(api: TestClient) -> None:
    broken = api.post("/api/inspect", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"] == "invalid_request"
    not_object = api.post("/api/inspect", json=[1, 2])
    assert not_object.status_code == 422
    huge = api.post("/api/inspect", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["message"]
    chunked = api.post("/api/inspect", content=iter([b"x" * 40_000, b"x" * 40_000]), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["message"]
    assert api.get("/api/nothing").json() == {"error": "http", "message": "Not Found"}
    assert api.get("/api/inspect").status_code == 405
    assert api.get("/api/results/zzz").status_code == 404
    unknown = api.get("/api/results/0123456789abcdef")
    assert unknown.status_code == 404 and unknown.json()["error"] == "result_not_found"
    assert api.get("/api/results/0123456789abcdef/csv").status_code == 404
    bad_value = api.post("/api/inspect", json=body(source_layers="0")).json()["result_id"]
    assert api.get(f"/api/results/{bad_value}/png?value=logits").status_code == 400


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"model": "tiny-llama", "prompt": "a" * 401}, 422, "max_prompt_chars"),
        ({"model": "../x", "prompt": "hi"}, 422, "model"),
        ({"model": "other", "prompt": "hi"}, 400, "not allowed"),
        ({"model": "tiny-llama", "prompt": ""}, 422, "prompt"),
        ({"model": "tiny-llama"}, 422, "prompt"),
    ],
)
def test_bad_tokenize_requests(api: TestClient, payload: dict, status: int, fragment: str) -> None:
    response = api.post("/api/tokenize", json=payload)
    assert response.status_code == status and fragment in response.json()["message"]


def test_internal_errors_hide_the_trace() -> None:
    def broken(name: str):  # noqa: ANN202
        raise RuntimeError("secret detail of the machine")

    api = TestClient(create_app(["tiny-llama"], loader=broken), raise_server_exceptions=False)
    response = api.post("/api/tokenize", json={"model": "tiny-llama", "prompt": "hi"})
    assert response.status_code == 500 and response.json()["error"] == "internal"
    assert "secret" not in response.text and "Traceback" not in response.text


def test_app_refuses_empty_allow_list_and_maps_for_other_models() -> None:
    from patchscopes.server.errors import ModelNotAllowedError, ServerError

    with pytest.raises(ServerError, match="no models allowed"):
        create_app([])
    with pytest.raises(ModelNotAllowedError, match="tiny-qwen2"):
        create_app(["tiny-llama"], loader=loader, maps=[_map()])


def test_serve_command_takes_registry_names_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from patchscopes.cli import app as cli

    runner = CliRunner()
    for bad in ("./models/evil", "/tmp/model", "gpt2"):
        result = runner.invoke(cli, ["serve", "--models", bad, "--no-preload"])
        assert result.exit_code != 0 and "not a registry model" in result.output
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    from patchscopes.models.registry import find_registry_model

    if not find_registry_model("SmolLM2-135M").is_installed():  # type: ignore[union-attr]
        pytest.skip("SmolLM2-135M is not installed")
    missing_map = runner.invoke(cli, ["serve", "--models", "SmolLM2-135M", "--map", "no-such-map-dir", "--no-preload"])
    assert missing_map.exit_code == 2 and "not a saved affine map" in missing_map.output
    result = runner.invoke(cli, ["serve", "--models", "smollm2", "--no-preload", "--port", "8123", "--queue", "2"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["host"] == "127.0.0.1" and call["port"] == 8123
    assert call["app"].state.pool.allowed == ["SmolLM2-135M"] and call["app"].state.jobs.capacity == 2


def test_a_failure_during_the_work_is_reported_without_the_trace() -> None:
    import copy

    from patchscopes.models.loading import from_model

    base = tiny_model("llama")
    model = copy.deepcopy(base.model)

    def explode(module, args):  # noqa: ANN001, ANN202
        raise RuntimeError("secret detail of the machine")

    model.model.layers[2].register_forward_pre_hook(explode)
    broken = from_model(model, base.tokenizer, name="broken", check=False)  # the load-time probe would refuse it
    api = TestClient(create_app(["broken"], loader=lambda name: broken), raise_server_exceptions=False)
    request = {"model": "broken", "prompt": PROMPT, "preset": "custom", "target_prompt": "cat -> x", "source_layers": "0"}
    plain = api.post("/api/inspect", json=request)
    assert plain.status_code == 500 and plain.json()["error"] == "internal" and "secret" not in plain.text
    with api.stream("POST", "/api/inspect/stream", json=request) as response:
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[-1]["type"] == "error" and events[-1]["error"] == "internal" and "secret" not in json.dumps(events)
    assert api.get("/api/health").json()["queue"]["failed"] == 2
