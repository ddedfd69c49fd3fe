"""End to end in a real headless browser: Debian's chromium driven by Playwright (no browser download).

Opens the page served by a real uvicorn server with SmolLM2-135M, types a prompt, picks a token, runs a
token-identity grid and checks the layer table and the heatmap, the hover details, the CSV export and
that the page's URL reproduces the view, and that Cancel stops the server's job; then, on a slowed tiny
model, that the page waits out a full queue (429) and succeeds. Set ``PATCHSCOPES_ARTIFACTS`` to keep the
screenshot.
"""

from __future__ import annotations

import csv as csv_module
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchscopes.server import create_app
from patchscopes.server.background import serve_in_thread

CHROMIUM = os.environ.get("PATCHSCOPES_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "The capital of France is"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"no chromium binary at {CHROMIUM}: apt-get install -y chromium (or set PATCHSCOPES_CHROMIUM)",
)


@pytest.fixture(scope="module")
def server(smol) -> Iterator[tuple[str, object]]:  # noqa: ANN001
    app = create_app(["SmolLM2-135M"], loader=lambda name: smol)
    with serve_in_thread(app) as base:
        yield base, app


@pytest.fixture
def browser(tmp_path: Path):  # noqa: ANN201
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
            bypass_csp=True,  # the test's own wait_for_function runs through eval, which the page's CSP forbids
        )
        yield context
        context.close()


@pytest.mark.real
def test_inspection_in_a_real_browser(server, browser, tmp_path: Path) -> None:  # noqa: ANN001
    url, app = server
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#prompt", PROMPT)
    page.wait_for_function("document.querySelectorAll('#tokens .tok').length === 5")
    page.click("#tokens .tok[data-index='4']")  # " is"
    assert page.locator("#tokens .tok.selected").inner_text() == "␣is"
    page.select_option("#preset", "token-identity")
    page.fill("#source-layers", "0-28:7")
    page.fill("#target-layers", "0-28:7")
    page.fill("#answer", " Paris")
    page.click("#run")
    page.wait_for_selector("#status:has-text('done')", timeout=90_000)

    rows = page.locator("#results-table tbody tr")
    assert rows.count() == 25 and page.locator("#heatmap rect.cell").count() == 25
    top = page.locator("#results-table tbody tr[data-source='28'][data-target='28'] td.decoded").inner_text()
    assert top.strip() == "Paris"  # the last layers' state of " is" already says what comes next
    values = [float(v) for v in page.eval_on_selector_all("#heatmap rect.cell", "els => els.map(e => e.dataset.value)")]
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) > 0.5

    page.hover("#heatmap rect.cell[data-source='28'][data-target='28']")
    assert "ℓ = 28, ℓ* = 28" in page.locator("#tooltip").inner_text() and "Paris" in page.locator("#tooltip").inner_text()
    page.select_option("#heat-value", "answer_prob")
    answer_values = page.eval_on_selector_all("#heatmap rect.cell", "els => els.map(e => e.dataset.value)")
    assert max(float(v) for v in answer_values) > 0.5

    csv = page.request.get(url + page.get_attribute("#export-csv", "href"))
    table = list(csv_module.DictReader(io.StringIO(csv.text())))
    assert (
        csv.ok and len(table) == 25 and {r["top1"] for r in table if r["source_layer"] == r["target_layer"] == "28"} == {" Paris"}
    )
    png = page.request.get(url + page.get_attribute("#export-png", "href"))
    assert png.ok and png.body()[:4] == b"\x89PNG"

    out_dir = Path(os.environ.get("PATCHSCOPES_ARTIFACTS") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out_dir / "explorer.png"))

    shared = page.url
    assert "run=1" in shared and "prompt=The+capital+of+France+is" in shared and "position=4" in shared
    again = browser.new_page()
    again.goto(shared)
    again.wait_for_selector("#status:has-text('done')", timeout=60_000)
    assert again.locator("#results-table tbody tr").count() == 25
    assert again.input_value("#source-layers") == "0-28:7" and again.input_value("#heat-value") == "answer_prob"
    assert again.locator("#tokens .tok.selected").inner_text() == "␣is"

    # a long generation, cancelled from the page: the server stops the job
    again.select_option("#preset", "entity-description")
    again.fill("#source-layers", "all")
    again.fill("#target-layers", "same")
    again.fill("#max-new-tokens", "20")
    again.click("#run")
    again.wait_for_selector("#status:has-text('running')", timeout=30_000)
    again.click("#cancel")
    again.wait_for_selector("#status:has-text('cancelled')", timeout=10_000)
    deadline = time.monotonic() + 60
    while app.state.jobs.snapshot()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = app.state.jobs.snapshot()
    assert stats["active"] == 0 and stats["cancelled"] == 1 and stats["completed"] == 1
    assert errors == []


def test_the_page_waits_out_a_busy_server(browser) -> None:  # noqa: ANN001
    import copy
    import json
    import threading

    import httpx

    from patchscopes.models.loading import from_model
    from patchscopes.server import Limits
    from tiny import tiny_model

    base = tiny_model("llama")
    model = copy.deepcopy(base.model)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    slow = from_model(model, base.tokenizer, name="slow")
    app = create_app(["slow"], loader=lambda name: slow, limits=Limits(queue_capacity=1, workers=1))
    release, holding = threading.Event(), threading.Event()
    busy = {"model": "slow", "prompt": "Busy", "source_layers": "all", "target_layers": "all", "max_new_tokens": 40}

    def occupy(url: str) -> None:  # holds the only slot until released, then drops the connection
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/api/inspect/stream", json=busy) as stream:
            lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
            assert json.loads(next(lines))["type"] == "queued"
            holding.set()
            release.wait(60)

    with serve_in_thread(app) as url:
        worker = threading.Thread(target=occupy, args=(url,))
        worker.start()
        assert holding.wait(30)
        page = browser.new_page()
        page.goto(url + "/?model=slow&prompt=The+capital+of+France&source_layers=1&position=0")
        page.wait_for_selector("body[data-ready='1']")
        assert page.get_attribute("#tokens .tok.selected", "data-index") == "0"  # the first token, from the URL
        page.click("#run")
        page.wait_for_selector("#status:has-text('server busy')", timeout=15_000)
        release.set()  # the blocking client leaves: its job is cancelled and the page's next try gets in
        worker.join(30)
        page.wait_for_selector("#status:has-text('done')", timeout=30_000)
        assert page.locator("#results-table tbody tr").count() == 1
        assert "at position 0" in page.inner_text("#summary")
        assert page.locator("#error").is_hidden()
    stats = app.state.jobs.snapshot()
    assert stats["rejected"] >= 1 and stats["cancelled"] == 1 and stats["completed"] == 1
