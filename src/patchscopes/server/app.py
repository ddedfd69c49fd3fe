"""The explorer's web app: a single page and a JSON API over the library (OpenAPI at ``/docs``).

    >>> from patchscopes.server import create_app
    >>> app = create_app(["SmolLM2-135M"])            # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app)              # doctest: +SKIP

Models are named from the allow-list given here; the browser never names a path. Model work runs in
a bounded :class:`~patchscopes.server.jobs.JobQueue` (429 + Retry-After beyond it); a client that goes
away cancels its job between chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchscopes.errors import PatchscopeError
from patchscopes.mappings import AffineMap
from patchscopes.presets import ENTITY_DESCRIPTION_PROMPT, TOKEN_IDENTITY_PROMPT
from patchscopes.server import exports
from patchscopes.server.errors import (
    CancelledError,
    LimitError,
    QueueFullError,
    RequestTimeoutError,
    ResultNotFoundError,
    ServerError,
)
from patchscopes.server.guard import BodyLimit, HostCheck, SecurityHeaders
from patchscopes.server.jobs import Job, JobQueue
from patchscopes.server.limits import Limits
from patchscopes.server.plan import Plan, make_plan
from patchscopes.server.pool import Loader, MapIndex, ModelPool
from patchscopes.server.schemas import ERRORS, ErrorBody, InspectRequest, InspectResponse, TokenizeRequest
from patchscopes.server.work import run_plan

log = logging.getLogger("patchscopes.server")
STATIC = files("patchscopes.server") / "static"
RESULT_ID = r"^[0-9a-f]{16}$"


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


def _error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServerError):
        return {"type": "error", "error": exc.kind, "message": str(exc)}
    if isinstance(exc, PatchscopeError):
        return {"type": "error", "error": type(exc).__name__, "message": str(exc)}
    log.exception("inspection failed", exc_info=exc)
    return {"type": "error", "error": "internal", "message": "internal error while running the inspection; see the server log"}


def _awaitable(job: Job) -> asyncio.Future[Any]:
    """The job's outcome as an asyncio future whose error counts as seen even when nobody awaits it."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(429, exc.kind, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        return _error(exc.status, exc.kind, str(exc))

    @app.exception_handler(PatchscopeError)
    async def library_error(request: Request, exc: PatchscopeError) -> JSONResponse:
        return _error(422, type(exc).__name__, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, "internal", "internal server error; see the server log")


def create_app(
    allowed_models: Sequence[str],
    *,
    loader: Loader | None = None,
    maps: Sequence[AffineMap] = (),
    limits: Limits | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The explorer app serving ``allowed_models`` (registry names; ``loader`` overrides how they load).

    It answers only to loopback Host names and ``allowed_hosts`` (against DNS rebinding).
    """
    limits = limits or Limits()
    pool = ModelPool(allowed_models, loader)
    map_index = MapIndex(maps)
    for pair in map_index.pairs():
        pool.check(pair["source"]), pool.check(pair["target"])
    jobs = JobQueue(workers=limits.workers, capacity=limits.queue_capacity)
    results = exports.ResultStore(limits.max_results)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.shutdown()

    app = FastAPI(
        title="Patchscopes explorer",
        version="1",
        description="Inspect hidden states of language models with Patchscopes. "
        "Models come from the allow-list the server was started with.",
        lifespan=lifespan,
    )
    app.state.pool, app.state.jobs, app.state.results, app.state.limits = pool, jobs, results, limits
    _install_error_handlers(app)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    app.add_middleware(SecurityHeaders)  # outermost: the guards' own answers get the headers too
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/health", summary="Liveness and the queue's state")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queue": jobs.snapshot(), "results_kept": len(results)}

    @app.get("/api/models", summary="Allowed models, cross-model maps, presets and the server's bounds")
    async def models() -> dict[str, Any]:
        infos = [await run_in_threadpool(pool.info, name) for name in pool.allowed]
        return {
            "models": infos,
            "maps": map_index.pairs(),
            "presets": {
                "token-identity": {"target_prompt": TOKEN_IDENTITY_PROMPT, "placeholder": "?"},
                "entity-description": {"target_prompt": ENTITY_DESCRIPTION_PROMPT, "placeholder": "x"},
                "attribute": {"target_prompt": "The official language of x is", "placeholder": "x"},
                "custom": {"target_prompt": "x", "placeholder": "x"},
                "logit-lens": {"target_prompt": None, "placeholder": None},
            },
            "limits": limits.to_dict(),
        }

    @app.post("/api/tokenize", summary="Split a prompt into tokens with character spans", responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if len(body.prompt) > limits.max_prompt_chars:
            raise LimitError(
                f"the prompt length is {len(body.prompt)}, over this server's max_prompt_chars={limits.max_prompt_chars}"
            )
        lm = await run_in_threadpool(pool.get, body.model)
        tokens = lm.tokenize(body.prompt)
        strings = lm.token_strings(tokens.ids)
        return {
            "model": lm.name,
            "tokens": [
                {"index": i, "id": tid, "text": text, "start": s, "end": e}
                for i, (tid, text, (s, e)) in enumerate(zip(tokens.ids, strings, tokens.offsets))
            ],
        }

    async def _plan(body: InspectRequest) -> Plan:
        jobs.refuse_if_full()  # before loading or tokenizing anything
        return await run_in_threadpool(make_plan, body, pool, map_index, limits)

    def _submit(plan: Plan, stream: bool) -> tuple[Job, asyncio.Queue[dict[str, Any]]]:
        """Queue the plan's work; with ``stream`` its progress events arrive in the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def listener(event: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                pass

        job = jobs.submit(lambda ctx: run_plan(plan, pool, ctx, limits.chunk_cells), listener=listener if stream else None)
        return job, events

    def _store(body: InspectRequest, plan: Plan, rows: list[dict[str, Any]], elapsed: float) -> str:
        record = {"request": body.model_dump(), "plan": plan.summary(), "rows": rows, "elapsed_s": round(elapsed, 3)}
        return results.add(record, key=body.model_dump_json())

    @app.post(
        "/api/inspect",
        summary="Run an inspection and return all rows (cancelled if the client disconnects)",
        response_model=InspectResponse,
        response_model_exclude_unset=True,
        responses=ERRORS,
    )
    async def inspect(body: InspectRequest, request: Request) -> dict[str, Any]:
        cached = results.find(body.model_dump_json())
        if cached is not None:  # the same request ran recently (a shared link, say): answer from the store
            return {"result_id": cached["id"], "plan": cached["plan"], "rows": cached["rows"], "elapsed_s": 0.0, "cached": True}
        plan = await _plan(body)
        start = time.monotonic()
        job, _ = _submit(plan, stream=False)
        future = _awaitable(job)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=0.25)
                if not future.done() and await request.is_disconnected():
                    job.cancel()
                    raise CancelledError("client disconnected")
                if not future.done() and time.monotonic() - start > limits.request_timeout:
                    job.cancel()
                    raise _timed_out(limits)
            rows = future.result()
        finally:
            if not job.future.done():
                job.cancel()
        rid = _store(body, plan, rows, time.monotonic() - start)
        return {"result_id": rid, "plan": plan.summary(), "rows": rows, "elapsed_s": round(time.monotonic() - start, 3)}

    @app.post(
        "/api/inspect/stream",
        summary="Run an inspection, streaming NDJSON events: queued, started, rows (with progress), done or error",
        response_class=StreamingResponse,
        responses=ERRORS,
    )
    async def inspect_stream(body: InspectRequest, request: Request) -> StreamingResponse:
        cached = results.find(body.model_dump_json())
        if cached is not None:
            return StreamingResponse(_replay(cached, jobs.snapshot()), media_type="application/x-ndjson")
        plan = await _plan(body)
        start = time.monotonic()
        job, events = _submit(plan, stream=True)

        async def stream() -> AsyncIterator[str]:
            future = _awaitable(job)
            try:
                yield json.dumps({"type": "queued", "job": job.id, "plan": plan.summary(), "queue": jobs.snapshot()}) + "\n"
                while not (future.done() and events.empty()):
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel()
                            return
                        if not future.done() and time.monotonic() - start > limits.request_timeout:
                            job.cancel()
                            yield json.dumps(_error_event(_timed_out(limits))) + "\n"
                            return
                        continue
                    yield json.dumps(event) + "\n"
                try:
                    rows = future.result()
                except BaseException as exc:  # noqa: BLE001 - reported to the client as an event
                    yield json.dumps(_error_event(exc)) + "\n"
                    return
                rid = _store(body, plan, rows, time.monotonic() - start)
                yield (
                    json.dumps(
                        {"type": "done", "result_id": rid, "rows": len(rows), "elapsed_s": round(time.monotonic() - start, 3)}
                    )
                    + "\n"
                )
            finally:
                if not job.future.done():
                    job.cancel()

        return StreamingResponse(stream(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    @app.get("/api/results/{rid}", summary="A finished result (the last few are kept)", responses={404: {"model": ErrorBody}})
    async def result(rid: str) -> dict[str, Any]:
        return {k: v for k, v in results.get(_rid(rid)).items() if k != "key"}

    @app.get("/api/results/{rid}/csv", summary="A finished result as CSV", response_class=Response)
    async def result_csv(rid: str) -> Response:
        data = results.get(_rid(rid))
        return Response(
            exports.to_csv(data),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="patchscopes-{rid}.csv"'},
        )

    @app.get(
        "/api/results/{rid}/png",
        summary="A finished result as PNG: heatmap for a grid, text table otherwise",
        response_class=Response,
    )
    async def result_png(rid: str, value: str = Query("top1_prob", description="top1_prob or answer_prob")) -> Response:
        data = results.get(_rid(rid))
        png = await run_in_threadpool(exports.to_png, data, value)
        return Response(
            png, media_type="image/png", headers={"Content-Disposition": f'attachment; filename="patchscopes-{rid}.png"'}
        )

    return app


def _timed_out(limits: Limits) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the inspection did not finish within this server's request_timeout={limits.request_timeout:g} s and was "
        "stopped; ask for fewer layers or tokens, or restart with `patchscopes serve --request-timeout SECONDS`"
    )


async def _replay(cached: dict[str, Any], queue: dict[str, Any]) -> AsyncIterator[str]:
    """The events of a stored result, as if it had just run."""
    rows, total = cached["rows"], len(cached["rows"])
    events = [
        {"type": "queued", "job": None, "plan": cached["plan"], "queue": queue, "cached": True},
        {"type": "started", "total": total},
        {"type": "rows", "rows": rows, "done": total, "total": total},
        {"type": "done", "result_id": cached["id"], "rows": total, "elapsed_s": 0.0, "cached": True},
    ]
    for event in events:
        yield json.dumps(event) + "\n"


def _rid(rid: str) -> str:
    if not re.fullmatch(RESULT_ID, rid):
        raise ResultNotFoundError(f"result id {rid!r} is malformed; ids are 16 hex digits as returned by /api/inspect")
    return rid
