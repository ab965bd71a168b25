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

from gateway.store.limits import (
    Admission,
    AdmitCall,
    Hold,
    LimitCall,
    LimitCheck,
    RateCheck,
    SettleCall,
    Settlement,
    check_admit,
    check_settle,
    hold_ms,
    new_hold_id,
    now_ms,
)

Outcome = Admission | Settlement
Batch = list[tuple[LimitCall, "asyncio.Future[Outcome]"]]


class CoalescedLimits:
    """`Store.admit` and `Store.settle` of every backend: the arguments are checked at call time (a bad one
    raises for that call only), then the call goes to the backend's `_limit_call`, which runs it at once
    (memory) or queues it in a `Coalescer` (SQLite, Redis)."""

    async def _limit_call(self, call: LimitCall) -> Outcome:
        raise NotImplementedError

    async def admit(
        self, checks: Sequence[LimitCheck], *, hold_s: float = 660.0, now: float | None = None
    ) -> Admission:
        check_admit(checks, hold_s)
        outcome = await self._limit_call(AdmitCall(checks, now_ms(now), new_hold_id(), hold_ms(hold_s)))
        assert isinstance(outcome, Admission)
        return outcome

    async def settle(
        self, hold: Hold | None, spend: int, corrections: Sequence[RateCheck] = (), *, now: float | None = None
    ) -> Settlement:
        check_settle(hold, spend, corrections)
        if hold is None and not corrections:
            return Settlement((), ())
        outcome = await self._limit_call(SettleCall(hold, spend, corrections, now_ms(now)))
        assert isinstance(outcome, Settlement)
        return outcome


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
