"""What the store tests share: a fake clock and `Backend`, a way to open replicas of one store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.store import Store


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
