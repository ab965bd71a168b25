"""What the store tests share: a fake clock, `Backend` (a way to open replicas of one store), `probe`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.store import Store
from gateway.store.limits import BudgetCheck, BudgetResult, LimitCheck, RateCheck, RateResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """Opens stores on one shared state: the same file, the same Redis prefix (what replicas share)."""

    name: str
    factory: Callable[[], Store]
    clock: FakeClock | None = None
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = self.factory()
        self.opened.append(store)
        return store

    async def sleep(self, seconds: float) -> None:
        """Let `seconds` pass for TTLs: instantly on the fake clock of memory://, really elsewhere."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


async def probe(store: Store, checks: list[LimitCheck], now: float) -> tuple[RateResult | BudgetResult, ...]:
    """The state of the checks' counters, read without taking anything."""
    zero: list[LimitCheck] = [
        RateCheck(c.key, c.limit, 0, c.period_s, c.burst)
        if isinstance(c, RateCheck)
        else BudgetCheck(c.key, c.limit, 0, c.expires_at, c.alert_at)
        for c in checks
    ]
    return (await store.admit(zero, now=now)).results
