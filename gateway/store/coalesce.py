"""Coalescing of limit calls: those issued in one event-loop iteration go to the store together.

`Coalescer.submit(call)` queues the call and, for the first of a batch, schedules one flush with
`loop.call_soon`. Every call queued before that flush runs, i.e. by everything the loop runs in the
same iteration (all tasks a `gather` started, all requests whose bodies arrived together), joins the
batch. The backend's `run` receives the batch in call order and must resolve every future, with its
result or an exception, before or after it returns (SQLite runs the batch at once on the loop thread;
Redis starts a task that sends it as one script call).

An admit whose caller was cancelled before the flush is dropped: nobody would settle its hold, which
would hold budget until it lapsed. A settle always runs: the spend it records happened.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Sequence

from gateway.store.limits import Admission, AdmitCall, LimitCall, Settlement

Outcome = Admission | Settlement
Batch = list[tuple[LimitCall, "asyncio.Future[Outcome]"]]


class Coalescer:
    def __init__(self, run: Callable[[Batch], None]) -> None:
        self._run = run
        self._queue: Batch = []

    def submit(self, call: LimitCall) -> asyncio.Future[Outcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        if not self._queue:
            loop.call_soon(self.flush)
        self._queue.append((call, future))
        return future

    def flush(self) -> None:
        """Hand what is queued to the backend now (also called by `aclose`, before the connections go)."""
        batch, self._queue = self._queue, []
        batch = [(call, future) for call, future in batch if not (future.cancelled() and isinstance(call, AdmitCall))]
        if batch:
            self._run(batch)


def resolve(batch: Batch, outcomes: Sequence[Outcome]) -> None:
    for (_, future), outcome in zip(batch, outcomes, strict=True):
        if not future.done():
            future.set_result(outcome)


def fail(batch: Batch, error: BaseException) -> None:
    """Raise `error` in every caller still waiting, each its own copy: one shared instance would collect
    all their tracebacks (an exception that cannot be copied is shared)."""
    for _, future in batch:
        if not future.done():
            try:
                own = copy.copy(error)
            except Exception:
                own = error
            future.set_exception(own)
