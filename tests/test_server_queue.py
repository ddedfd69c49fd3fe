"""The explorer under load, against a real uvicorn server: the bounded queue (429 + Retry-After), the page
staying responsive during a slow sweep, and a disconnecting client cancelling its work."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from patchscopes.models.loading import ModelHandle, from_model
from patchscopes.server import Limits, create_app
from patchscopes.server.background import serve_in_thread
from patchscopes.server.errors import CancelledError, QueueFullError
from patchscopes.server.jobs import JobQueue
from tiny import tiny_model

SLOW = {"model": "slow", "prompt": "The capital of France is Paris", "preset": "custom", "target_prompt": "cat -> x"}


def grid(prompt: str) -> dict[str, object]:
    """16 cells in 4 chunks of 4 (a new prompt each time: a repeated request is answered from the store)."""
    return {**SLOW, "prompt": prompt, "source_layers": "all", "target_layers": "all", "max_new_tokens": 6}


def slow_model(delay: float = 0.01) -> ModelHandle:
    """A private copy of the tiny Llama whose every block sleeps ``delay`` seconds per call."""
    base = tiny_model("llama")
    model = copy.deepcopy(base.model)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return from_model(model, base.tokenizer, name="slow")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, object]]:
    model = slow_model()
    app = create_app(["slow"], loader=lambda name: model, limits=Limits(queue_capacity=1, workers=1, chunk_cells=4))
    with serve_in_thread(app) as url:
        yield url, app


def wait_idle(client: httpx.Client, url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = client.get(f"{url}/api/health").json()["queue"]
        if queue["active"] == 0:
            return queue
        time.sleep(0.05)
    raise AssertionError(f"the queue did not drain: {queue}")


def test_job_queue_runs_rejects_and_cancels() -> None:
    q = JobQueue(workers=1, capacity=2)
    gate = threading.Event()
    first = q.submit(lambda ctx: gate.wait(10) and "first")
    second = q.submit(lambda ctx: "second")
    with pytest.raises(QueueFullError) as full:
        q.submit(lambda ctx: "third")
    assert full.value.retry_after >= 1 and "capacity 2" in str(full.value)
    second.cancel()  # cancelled while waiting: never runs
    gate.set()
    assert first.future.result(timeout=10) == "first"
    with pytest.raises(CancelledError):
        second.future.result(timeout=10)
    stats = q.snapshot()
    assert stats["completed"] == 1 and stats["cancelled"] == 1 and stats["rejected"] == 1 and stats["active"] == 0
    q.shutdown()


def test_job_context_stops_between_steps() -> None:
    q = JobQueue(workers=1, capacity=1)
    steps: list[int] = []
    started = threading.Event()

    def work(ctx) -> None:  # noqa: ANN001
        for i in range(1000):
            ctx.check()
            steps.append(i)
            started.set()
            time.sleep(0.005)

    job = q.submit(work)
    started.wait(5)
    job.cancel()
    with pytest.raises(CancelledError):
        job.future.result(timeout=5)
    assert 0 < len(steps) < 1000
    q.shutdown()


def test_full_queue_answers_429_while_the_page_stays_responsive(server) -> None:  # noqa: ANN001
    url, _ = server
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/api/inspect/stream", json=grid("Apples are red")) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["type"] == "queued"
            start = time.monotonic()
            busy = client.post(f"{url}/api/inspect", json={**SLOW, "prompt": "Apples are green"})
            assert busy.status_code == 429 and busy.json()["error"] == "queue_full"
            assert int(busy.headers["Retry-After"]) >= 1
            assert client.post(f"{url}/api/inspect/stream", json={**SLOW, "prompt": "Apples"}).status_code == 429
            # the event loop is free: cheap endpoints answer at once while the sweep runs
            assert client.get(f"{url}/api/health").json()["queue"]["running"] == 1
            assert client.post(f"{url}/api/tokenize", json={"model": "slow", "prompt": "hello"}).status_code == 200
            assert client.get(f"{url}/").status_code == 200
            assert time.monotonic() - start < 3.0
            events = [json.loads(line) for line in lines]
        assert events[-1]["type"] == "done" and sum(len(e.get("rows", [])) for e in events if e["type"] == "rows") == 16
        wait_idle(client, url)
        served = client.post(f"{url}/api/inspect", json={**SLOW, "prompt": "Apples are green"})
        assert served.status_code == 200 and "cached" not in served.json()  # serving again


def test_stream_client_disconnect_cancels_the_job(server) -> None:  # noqa: ANN001
    url, app = server
    before = app.state.jobs.snapshot()["cancelled"]
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/api/inspect/stream", json=grid("Tokyo is in Japan")) as stream:
            for line in stream.iter_lines():
                if json.loads(line)["type"] == "rows":
                    break  # leave after the first chunk: closes the connection
        queue = wait_idle(client, url, timeout=10)
        assert queue["cancelled"] == before + 1
        assert client.post(f"{url}/api/inspect", json={**SLOW, "prompt": "Tokyo"}).status_code == 200


def test_plain_request_disconnect_cancels_the_job(server) -> None:  # noqa: ANN001
    url, app = server
    before = app.state.jobs.snapshot()["cancelled"]
    with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{url}/api/inspect", json=grid("Paris is in France"))
    with httpx.Client(timeout=30) as client:
        queue = wait_idle(client, url, timeout=10)
    assert queue["cancelled"] == before + 1


@pytest.mark.parametrize(
    ("source", "target", "new_tokens", "chunk_cells", "expected_size"),
    [
        ("all", "same", 0, 32, 32),
        ("all", "all", 0, 8, 8),
        ("all", "all", 0, 3, 3),
        ("0,1", "all", 8, 6, 2),
        ("all", "0", 40, 4, 1),
    ],
)
def test_chunks_cover_every_cell_once(source: str, target: str, new_tokens: int, chunk_cells: int, expected_size: int) -> None:
    from patchscopes.server.layers import parse_layers
    from patchscopes.server.schemas import InspectRequest
    from patchscopes.server.work import chunk_size, layer_chunks

    class FakePlan:  # only the fields the chunking reads
        request = InspectRequest(model="m", prompt="p", max_new_tokens=new_tokens)
        source_layers = parse_layers(source, 4)
        target_layers = "same" if target == "same" else parse_layers(target, 4)

    plan = FakePlan()
    assert chunk_size(plan, chunk_cells) == expected_size  # type: ignore[arg-type]
    cells = []
    for sources, targets in layer_chunks(plan, chunk_cells):  # type: ignore[arg-type]
        pairs = [(s, s) for s in sources] if targets == "same" else [(s, t) for s in sources for t in targets]
        assert len(pairs) <= max(expected_size, 1 if targets == "same" else len(targets))
        cells += pairs
    expected = (
        [(s, s) for s in plan.source_layers]
        if target == "same"
        else [(s, t) for s in plan.source_layers for t in plan.target_layers]
    )
    assert sorted(cells) == sorted(expected) and len(cells) == len(set(cells))


def test_cancellation_stops_inside_a_chunk_and_leaves_no_hooks() -> None:
    model = slow_model(delay=0.05)  # 4 blocks: 0.2 s a forward pass, 41 passes to generate 40 tokens
    app = create_app(["slow"], loader=lambda name: model, limits=Limits(chunk_cells=1000, max_generated_tokens=10_000))
    request = {**SLOW, "prompt": "One long chunk", "source_layers": "all", "target_layers": "all", "max_new_tokens": 40}
    hooks = [len(block._forward_hooks) for block in model.adapter.blocks]
    with serve_in_thread(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/api/inspect/stream", json=request) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["type"] == "queued"
            assert json.loads(next(lines))["type"] == "started"
            time.sleep(0.5)  # the single chunk (about 8 s) is under way
            left = time.monotonic()
        queue = wait_idle(client, url, timeout=5)
        assert time.monotonic() - left < 4.0 and queue["cancelled"] == 1 and queue["completed"] == 0
        assert [len(block._forward_hooks) for block in model.adapter.blocks] == hooks
        small = client.post(f"{url}/api/inspect", json={**SLOW, "source_layers": "1"})
        assert small.status_code == 200 and len(small.json()["rows"]) == 1
