"""Hardening of the explorer against a real uvicorn server on loopback (tiny random models): the Host allow-list,
stalled and oversize bodies, the connection limit, the context length, the request time limit, security headers,
CSV injection, and ``serve`` refusing bad options with exit code 2 and no traceback."""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from patchscopes.cli import app as cli
from patchscopes.models.loading import ModelHandle, from_model
from patchscopes.server import Limits, create_app
from patchscopes.server import cli as server_cli
from patchscopes.server.background import serve_in_thread
from patchscopes.server.exports import to_csv
from patchscopes.server.guard import HostCheck
from tiny import tiny_model

PROMPT = "The capital of France is Paris"
LLAMA = tiny_model("llama")


def body(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"model": "tiny-llama", "prompt": PROMPT, "preset": "custom", "target_prompt": "cat -> x"}
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    limits = Limits(body_timeout=0.5, max_body_bytes=4096, max_prompt_chars=5000)
    app = create_app(["tiny-llama"], loader=lambda name: LLAMA, limits=limits, allowed_hosts=["explorer.lan"])
    with serve_in_thread(app) as url:
        yield url


def _raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``request`` over a raw socket; return everything read until the server closes, and the seconds taken."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)  # raises socket.timeout if the server neither answers nor closes
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


def test_host_header_allow_list(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    evil = httpx.get(f"{server}/api/health", headers={"Host": "evil.example"})
    assert evil.status_code == 400 and evil.json()["error"] == "bad_host"
    assert "evil.example" in evil.json()["message"] and "--allow-host" in evil.json()["message"]
    rebound = httpx.post(f"{server}/api/tokenize", json={"model": "tiny-llama", "prompt": "hi"}, headers={"Host": f"evil:{port}"})
    assert rebound.status_code == 400
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "explorer.lan:8000"):
        ok = httpx.get(f"{server}/api/health", headers={"Host": name})
        assert ok.status_code == 200, (name, ok.text)
    assert httpx.get(f"{server}/api/health", headers={"Host": "explorer.lan.evil.example"}).status_code == 400


def test_a_stalled_body_is_answered_408_and_closed(server: str) -> None:
    request = (
        b"POST /api/tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"model": '
    )
    answer, seconds = _raw(server, request)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer and seconds < 5


def test_body_size_limit_declared_and_streamed(server: str) -> None:
    declared = httpx.post(f"{server}/api/inspect", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "max_body_bytes=4096" in declared.json()["message"]
    streamed = httpx.post(f"{server}/api/inspect", content=iter([b"x" * 3000, b"x" * 3000]))
    assert streamed.status_code == 413
    lying = b"POST /api/inspect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999\r\n\r\n"
    answer, _ = _raw(server, lying)
    assert answer.startswith(b"HTTP/1.1 413")


def test_a_prompt_over_the_context_length_is_refused(server: str) -> None:
    prompt = "Paris is a city. " * 60
    n_tokens = len(LLAMA.tokenize(prompt))
    assert n_tokens > 128  # the tiny models' max_position_embeddings
    response = httpx.post(f"{server}/api/inspect", json=body(prompt=prompt, source_layers="0"))
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert f"{n_tokens} tokens" in message and "context length of 128" in message
    long_target = httpx.post(f"{server}/api/inspect", json=body(target_prompt="cat x " * 70, source_layers="0"))
    assert long_target.status_code == 422 and "context length" in long_target.json()["message"]


def test_security_headers(server: str) -> None:
    for path in ("/", "/api/health", "/static/app.js", "/api/nothing"):
        response = httpx.get(server + path)
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp and "unsafe-inline" not in csp
    refused = httpx.get(f"{server}/api/health", headers={"Host": "evil.example"})
    assert refused.headers["x-frame-options"] == "DENY"
    assert "unsafe-inline" in httpx.get(f"{server}/docs").headers["content-security-policy"]  # Swagger UI needs it


def test_the_page_works_under_its_csp() -> None:
    """The strict CSP allows no inline script or style: the page must have none."""
    from patchscopes.server.app import STATIC

    page = (STATIC / "index.html").read_text(encoding="utf-8")
    scripts = page.count("<script")
    assert scripts >= 1 and scripts == page.count("<script src=")
    assert " style=" not in page and "<style" not in page and " onclick=" not in page


def test_the_page_runs_in_a_browser_under_its_csp(tmp_path: Path) -> None:
    """A real inspection in headless chromium with the CSP enforced: no violation, and the heatmap is drawn."""
    import os
    import shutil

    chromium = os.environ.get("PATCHSCOPES_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.skip(f"no chromium binary at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api")
    app = create_app(["tiny-llama"], loader=lambda name: LLAMA)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with serve_in_thread(app) as url, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium, args=args)
        try:
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_selector("#tokens .tok")
            page.fill("#source-layers", "0-3")
            page.fill("#target-layers", "0-3")
            page.click("#run")
            page.wait_for_selector("#status:has-text('done')", timeout=60_000)
            assert page.locator("#heatmap rect.cell").count() == 16
            assert not problems, problems
        finally:
            context.close()


def test_connection_limit() -> None:
    app = create_app(["tiny-llama"], loader=lambda name: LLAMA, limits=Limits(max_connections=3))
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{url}/api/health").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/api/health").status_code == 200


def test_idle_and_trickling_connections_are_closed_after_the_header_timeout() -> None:
    app = create_app(["tiny-llama"], loader=lambda name: LLAMA, limits=Limits(header_timeout=0.5, max_connections=2))
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)), timeout=5)
        partial = socket.create_connection((host, int(port)), timeout=5)
        partial.sendall(b"GET /api/health HTTP/1.1\r\nHost: loc")
        start = time.monotonic()
        try:
            assert idle.recv(100) == b"" and partial.recv(100) == b""  # closed by the server, not a timeout here
        finally:
            idle.close(), partial.close()
        assert time.monotonic() - start < 4
        assert httpx.get(f"{url}/api/health").status_code == 200  # the slots are free again
        with httpx.Client() as client:  # a kept-alive connection still serves several requests
            assert [client.get(f"{url}/api/health").status_code for _ in range(3)] == [200, 200, 200]


def _slow_model(seconds: float) -> ModelHandle:
    model = copy.deepcopy(LLAMA.model)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return from_model(model, LLAMA.tokenizer, name="slow", check=False)


def test_request_time_limit() -> None:
    slow = _slow_model(0.05)
    app = create_app(["slow"], loader=lambda name: slow, limits=Limits(request_timeout=0.5))
    request = body(model="slow", source_layers="all", target_layers="all", max_new_tokens=5)
    with serve_in_thread(app) as url, httpx.Client(timeout=30) as client:
        start = time.monotonic()
        plain = client.post(f"{url}/api/inspect", json=request)
        assert plain.status_code == 504, plain.text
        assert plain.json()["error"] == "timeout" and "request_timeout=0.5" in plain.json()["message"]
        assert "--request-timeout" in plain.json()["message"] and time.monotonic() - start < 10
        with client.stream("POST", f"{url}/api/inspect/stream", json={**request, "max_new_tokens": 4}) as response:
            events = [json.loads(line) for line in response.iter_lines() if line]
        assert events[-1]["type"] == "error" and events[-1]["error"] == "timeout"
        deadline = time.monotonic() + 10
        while app.state.jobs.snapshot()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = app.state.jobs.snapshot()
        assert stats["active"] == 0 and stats["cancelled"] == 2  # the timed-out work was stopped, not left running
        assert client.get(f"{url}/api/health").status_code == 200


def test_strict_ints_and_logit_lens_without_target_layers() -> None:
    api = TestClient(create_app(["tiny-llama"], loader=lambda name: LLAMA), raise_server_exceptions=False)
    for field, value in (("position", True), ("position", 1.0), ("max_new_tokens", True), ("position", "1")):
        response = api.post("/api/inspect", json=body(**{field: value}))
        assert response.status_code == 422 and field in response.json()["message"], (field, value)
    lens = body(preset="logit-lens", target_prompt=None, source_layers="0,1", target_layers="1,2")
    response = api.post("/api/inspect", json={k: v for k, v in lens.items() if v is not None})
    assert response.status_code == 422 and "logit lens" in response.json()["message"]
    assert "target_layers 'same'" in response.json()["message"]
    ok = api.post("/api/inspect", json={**{k: v for k, v in lens.items() if v is not None}, "target_layers": "same"})
    assert ok.status_code == 200


def test_csv_escapes_formulas_and_keeps_numbers() -> None:
    cells = ['=HYPERLINK("http://evil")', "+1+1", "-cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx", "Paris", "-0.5"]
    rows = [
        {"source_layer": i, "target_layer": i, "summary": c, "text": c, "top1": c, "top1_prob": -0.5, "top_tokens": [c]}
        for i, c in enumerate(cells)
    ]
    plan = {"model": "m", "target_model": "m", "preset": "custom", "position": 0, "source_token": "=1"}
    result = {"rows": rows, "plan": plan, "request": {"prompt": "=2+3"}}
    table = list(csv.DictReader(io.StringIO(to_csv(result))))
    got = [r["summary"] for r in table]
    assert got == ["'" + c for c in cells[:6]] + ["Paris", "-0.5"]
    assert all(r["prompt"] == "'=2+3" and r["source_token"] == "'=1" for r in table)
    assert all(r["top1_prob"] == "-0.5" for r in table)  # a number stays a number
    assert all(
        not r[k].startswith(("=", "+", "-", "@", "\t", "\r")) for r in table for k in r if k != "top1_prob" and r[k] != "-0.5"
    )


# --- serve: bad options exit 2 with a message, never a traceback -------------------------------------------------


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """``serve`` with any registry name accepted and uvicorn not started; the calls uvicorn.run would get."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(server_cli, "_check_registry", lambda names: names)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


BAD_OPTIONS = [
    (["--workers", "0"], "--workers"),
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--queue", "0"], "--queue"),
    (["--queue", "-5"], "--queue"),
    (["--max-prompt-chars", "-1"], "--max-prompt-chars"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--max-cells", "0"], "--max-cells"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--max-connections", "0"], "--max-connections"),
    (["--host", "0.0.0.0"], "--expose"),
    (["--host", "192.168.1.20"], "--expose"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_OPTIONS)
def test_serve_refuses_bad_options(no_server: list[dict[str, object]], args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(cli, ["serve", "--models", "SmolLM2-135M", "--no-preload", *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not no_server


def test_serve_refuses_a_corrupt_map(no_server: list[dict[str, object]], tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text("{not json")
    (tmp_path / "weights.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["serve", "--models", "SmolLM2-135M", "--no-preload", "--map", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(tmp_path) in result.output.replace("\n", "") and "damaged" in result.output
    assert not no_server


def test_serve_expose_and_allow_host(no_server: list[dict[str, object]]) -> None:
    args = ["serve", "--models", "SmolLM2-135M", "--no-preload", "--host", "10.1.2.3", "--expose", "--allow-host", "box.lan"]
    result = CliRunner().invoke(cli, [*args, "--max-connections", "7", "--request-timeout", "9"])
    assert result.exit_code == 0, result.output
    (call,) = no_server
    assert call["host"] == "10.1.2.3" and call["limit_concurrency"] == 7 and call["proxy_headers"] is False
    app = call["app"]
    (guard,) = [m for m in app.user_middleware if m.cls is HostCheck]  # type: ignore[attr-defined]
    assert list(guard.kwargs["allowed_hosts"]) == ["box.lan", "10.1.2.3"]
    assert app.state.limits.request_timeout == 9  # type: ignore[attr-defined]


def test_a_verified_cache_without_the_wheel_is_servable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``serve`` and ``load_model`` agree: a registry model whose verified cache exists needs no wheel."""
    from patchscopes.models import registry
    from patchscopes.models.cache import CACHE_FORMAT, MANIFEST, cache_dir, is_loadable

    entry = dataclasses.replace(registry.REGISTRY["SmolLM2-135M"], is_installed=lambda: False)
    monkeypatch.setenv("PATCHSCOPES_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "find_registry_model", lambda name: entry)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("serve started a server"))
    assert not is_loadable(entry)
    refused = CliRunner().invoke(cli, ["serve", "--models", "SmolLM2-135M", "--no-preload"])
    assert refused.exit_code != 0 and "not installed" in refused.output
    directory = cache_dir(entry)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    files = {"model.safetensors": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
    manifest = {"format": CACHE_FORMAT, "model": entry.name, "gguf_sha256": entry.sha256, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    assert is_loadable(entry)
    assert server_cli._check_registry(["SmolLM2-135M"]) == ["SmolLM2-135M"]
    (directory / "model.safetensors").write_bytes(b"damaged")
    assert not is_loadable(entry)
