"""Load test of the Patchscopes explorer: N concurrent requests against a local server.

Checks that every request is answered (a result, or 429 with Retry-After), that the server's memory stays
bounded (resident set size before and after), and that it keeps serving afterwards. It only talks to
127.0.0.1 and stops by itself (every request has a timeout).

    python bench/load_test.py                         # starts `patchscopes serve` on a free port, SmolLM2-135M
    python bench/load_test.py --quick                 # one source layer per inspection: a fast smoke run
    python bench/load_test.py --url http://127.0.0.1:8000 --pid 12345   # an already running server

Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of process ``pid`` in MB (Linux /proc), or None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def payload(i: int, model: str, layers: str = "0-29:3") -> tuple[str, dict[str, Any]]:
    """Request ``i`` of the burst: a mix of streamed and plain inspections and tokenizations, all different."""
    prompt = f"Request {i}: the capital of France is"
    kind = ("inspect", "stream", "inspect", "tokenize")[i % 4]
    if kind == "tokenize":
        return "/api/tokenize", {"model": model, "prompt": prompt}
    body = {"model": model, "prompt": prompt, "preset": "token-identity", "source_layers": layers}
    return ("/api/inspect/stream" if kind == "stream" else "/api/inspect"), body


async def one(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        if path.endswith("/stream"):
            async with client.stream("POST", url + path, json=body) as response:
                status, retry = response.status_code, response.headers.get("Retry-After")
                if status == 200:  # a stream counts as answered only when it ends with its result
                    events = [json.loads(line) async for line in response.aiter_lines() if line]
                    if not events or events[-1]["type"] != "done":
                        status = "200-incomplete"
                else:
                    await response.aread()
        else:
            response = await client.post(url + path, json=body)
            status, retry = response.status_code, response.headers.get("Retry-After")
    except httpx.HTTPError as exc:
        return {"path": path, "status": f"error:{type(exc).__name__}", "seconds": time.monotonic() - start}
    return {"path": path, "status": status, "retry_after": retry, "seconds": round(time.monotonic() - start, 3)}


async def burst(url: str, model: str, n: int = 50, layers: str = "0-29:3", timeout: float = 300.0) -> list[dict[str, Any]]:
    """Send ``n`` requests at once and wait for all of them."""
    limits = httpx.Limits(max_connections=n + 5, max_keepalive_connections=n + 5)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(one(client, url, *payload(i, model, layers)) for i in range(n)))


def serves(url: str, model: str, attempts: int = 30) -> bool:
    """True when the server answers health, tokenize and a fresh inspection (waiting out 429s)."""
    with httpx.Client(timeout=120) as client:
        if client.get(url + "/api/health").status_code != 200:
            return False
        if client.post(url + "/api/tokenize", json={"model": model, "prompt": "still there?"}).status_code != 200:
            return False
        for _ in range(attempts):
            response = client.post(
                url + "/api/inspect",
                json={"model": model, "prompt": f"Still serving at {time.time():.3f}", "source_layers": "-1"},
            )
            if response.status_code == 200:
                return True
            if response.status_code != 429:
                return False
            time.sleep(float(response.headers.get("Retry-After", "1")))
    return False


def check(url: str, model: str, n: int, pid: int | None, layers: str = "0-29:3", max_growth_mb: float = 500.0) -> dict[str, Any]:
    """Warm up, burst, and check; returns a report whose ``ok`` says whether every check passed."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {url}: only a local server (127.0.0.1) may be targeted")
    with httpx.Client(timeout=300) as client:  # warm-up: the model is loaded and one request has run
        client.post(url + "/api/inspect", json={"model": model, "prompt": "Warm-up", "source_layers": "-1"}).raise_for_status()
    before = rss_mb(pid)
    start = time.monotonic()
    results = asyncio.run(burst(url, model, n, layers))
    elapsed = time.monotonic() - start
    after = rss_mb(pid)
    counts = Counter(str(r["status"]) for r in results)
    answered = all(r["status"] in (200, 429) for r in results)
    retry_ok = all(r.get("retry_after") for r in results if r["status"] == 429)
    still = serves(url, model)
    growth = None if before is None or after is None else after - before
    report = {
        "requests": n,
        "statuses": dict(counts),
        "all_answered": answered,
        "429_have_retry_after": retry_ok,
        "burst_seconds": round(elapsed, 2),
        "slowest_seconds": max(r["seconds"] for r in results),
        "rss_mb_before": before,
        "rss_mb_after": after,
        "rss_growth_mb": growth,
        "serves_afterwards": still,
    }
    report["ok"] = answered and retry_ok and still and (growth is None or growth < max_growth_mb)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running local server (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's process id, for its memory")
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--layers", default="0-29:3", help="source layers of each inspection")
    parser.add_argument("--queue", type=int, default=4, help="queue capacity of the server this script starts")
    parser.add_argument("--quick", action="store_true", help="one source layer per inspection (a fast smoke run)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
        from patchscopes.server.background import free_port

        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "patchscopes.cli",
            "serve",
            "--models",
            args.model,
            "--port",
            str(port),
            "--queue",
            str(args.queue),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the server did not start: {' '.join(cmd)}")
            time.sleep(0.5)
    try:
        report = check(url, args.model, args.requests, pid, "-1" if args.quick else args.layers)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
