"""`memory://`: a process-local store for tests and single-process demos."""

from __future__ import annotations

import time
from collections.abc import Callable


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = "memory://"
        self._clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= self._clock():
            del self._data[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._data[key] = (value, None if ttl_s is None else self._clock() + ttl_s)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def aclose(self) -> None:
        self._data.clear()
