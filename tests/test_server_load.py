"""The load-test script against an in-process server on a slowed tiny model: 50 concurrent requests are all
answered (a result or 429 with Retry-After), and the server serves afterwards."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

from patchscopes.models.loading import from_model
from patchscopes.server import Limits, create_app
from patchscopes.server.background import serve_in_thread
from tiny import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "load_test.py"


def load_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fifty_concurrent_requests_are_all_answered() -> None:
    base = tiny_model("llama")
    model = copy.deepcopy(base.model)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    slow = from_model(model, base.tokenizer, name="slow")
    app = create_app(["slow"], loader=lambda name: slow, limits=Limits(queue_capacity=2, workers=1))
    script = load_script()
    with serve_in_thread(app) as url:
        report = script.check(url, "slow", n=50, pid=None, layers="all")
    assert report["ok"], report
    assert report["all_answered"] and report["serves_afterwards"] and report["429_have_retry_after"]
    statuses = report["statuses"]
    assert statuses.get("429", 0) > 0 and statuses.get("200", 0) >= 13  # the 12 tokenizations and at least one inspection
    assert sum(statuses.values()) == 50
    stats = app.state.jobs.snapshot()
    assert stats["active"] == 0 and stats["rejected"] == statuses["429"]


def test_the_script_refuses_remote_hosts() -> None:
    import pytest

    with pytest.raises(SystemExit, match="only a local server"):
        load_script().check("http://example.org:8000", "slow", n=1, pid=None)
