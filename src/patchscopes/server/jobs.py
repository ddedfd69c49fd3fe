"""A bounded work queue: a fixed number of worker threads and a cap on jobs queued or running.

Beyond the cap, :meth:`JobQueue.submit` raises :class:`QueueFullError` with a Retry-After estimate.
Each job gets a :class:`JobContext` to report events and to notice cancellation between batches.

    >>> q = JobQueue(workers=1, capacity=2)
    >>> job = q.submit(lambda ctx: 6 * 7)
    >>> job.future.result(timeout=5)
    42
    >>> q.shutdown()
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from patchscopes.server.errors import CancelledError, QueueFullError

Listener = Callable[[dict[str, Any]], None]


class JobContext:
    """Handed to the work function: ``emit(event)`` reports progress, ``check()`` raises if cancelled."""

    def __init__(self, job: Job) -> None:
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_event.is_set()

    def check(self) -> None:
        """Raise :class:`~patchscopes.server.errors.CancelledError` when the job was cancelled."""
        if self.cancelled:
            raise CancelledError(f"job {self._job.id} was cancelled")

    def emit(self, event: dict[str, Any]) -> None:
        listener = self._job.listener
        if listener is not None:
            listener(event)


@dataclass
class Job:
    """One unit of queued work."""

    id: str
    future: Future[Any]
    cancel_event: threading.Event = field(default_factory=threading.Event)
    listener: Listener | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None

    def cancel(self) -> None:
        """Ask the work to stop at its next check (a job still waiting never starts)."""
        self.cancel_event.set()


class JobQueue:
    """``workers`` threads; at most ``capacity`` jobs queued or running at once."""

    def __init__(self, workers: int = 1, capacity: int = 4) -> None:
        if workers < 1 or capacity < workers:
            raise ValueError(f"need workers >= 1 and capacity >= workers, got workers={workers}, capacity={capacity}")
        self.workers, self.capacity = workers, capacity
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="patchscopes-job")
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._mean_seconds = 2.0
        self.stats = {"submitted": 0, "rejected": 0, "completed": 0, "failed": 0, "cancelled": 0}

    @property
    def active(self) -> int:
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the running mean job time × the queue ahead, per worker."""
        return max(1, min(120, math.ceil(self._mean_seconds * max(1, self.active) / self.workers)))

    def refuse_if_full(self) -> None:
        """Raise :class:`QueueFullError` now when no slot is free (a cheap check before preparing work)."""
        with self._lock:
            if len(self._active) >= self.capacity:
                self.stats["rejected"] += 1
                raise self._full()

    def _full(self) -> QueueFullError:
        return QueueFullError(
            f"the server is busy ({len(self._active)} jobs queued or running, capacity {self.capacity}); retry later",
            retry_after=self.retry_after(),
        )

    def submit(self, fn: Callable[[JobContext], Any], listener: Listener | None = None) -> Job:
        """Queue ``fn(ctx)``; raise :class:`QueueFullError` when ``capacity`` jobs are already in."""
        with self._lock:
            if len(self._active) >= self.capacity:
                self.stats["rejected"] += 1
                raise self._full()
            job = Job(id=f"j{next(self._ids)}", future=Future(), listener=listener)
            self._active[job.id] = job
            self.stats["submitted"] += 1
        self._executor.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: Callable[[JobContext], Any]) -> None:
        job.started = time.monotonic()
        result: Any = None
        error: BaseException | None = None
        try:
            if job.cancel_event.is_set():
                raise CancelledError(f"job {job.id} was cancelled before it started")
            result = fn(JobContext(job))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the job
            error = exc
        outcome = "completed" if error is None else "cancelled" if isinstance(error, CancelledError) else "failed"
        elapsed = time.monotonic() - job.started
        with self._lock:  # free the slot before anyone waiting on the future sees the outcome
            self._active.pop(job.id, None)
            self.stats[outcome] += 1
            if outcome == "completed":
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            running = sum(1 for j in self._active.values() if j.started is not None)
            return {
                "workers": self.workers,
                "capacity": self.capacity,
                "active": len(self._active),
                "running": running,
                **self.stats,
            }

    def shutdown(self) -> None:
        with self._lock:
            for job in self._active.values():
                job.cancel()
        self._executor.shutdown(wait=True, cancel_futures=False)
