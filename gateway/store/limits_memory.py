"""The limits of gateway/store/limits.py in dicts, for memory://: atomic because nothing in between awaits.

A window keeps a running total of its holds and a heap of their expiries, so a check is O(log n)
whatever the number of requests in flight: lapsed holds are popped and subtracted when met.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Window:
    spent: int = 0
    alerted: bool = False
    expires: int = 0
    held: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # hold id -> (amount, expires)
    lapses: list[tuple[int, str]] = field(default_factory=list)  # heap of (expires, hold id)


class MemoryLimits:
    """LimitState over dicts. Times in ms."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[int, int, int]] = {}  # key -> (level, at, expires)
        self._windows: dict[str, _Window] = {}
        self._next_purge = 0

    def purge(self, now: int) -> None:
        """Drop what has expired, once a minute at most, so that unread keys do not pile up."""
        if now < self._next_purge:
            return
        self._next_purge = now + 60_000
        for key in [key for key, (_, _, expires) in self._buckets.items() if expires <= now]:
            del self._buckets[key]
        for key in [key for key, window in self._windows.items() if window.expires <= now]:
            del self._windows[key]

    def bucket(self, key: str, now: int) -> tuple[int, int] | None:
        entry = self._buckets.get(key)
        return (entry[0], entry[1]) if entry is not None and entry[2] > now else None

    def put_bucket(self, key: str, level: int, at: int, expires: int) -> None:
        self._buckets[key] = (level, at, expires)

    def _window(self, key: str, now: int) -> _Window | None:
        window = self._windows.get(key)
        if window is None or window.expires <= now:  # it outlives its holds, so none is live
            self._windows.pop(key, None)
            return None
        while window.lapses and window.lapses[0][0] <= now:
            _, hold_id = heapq.heappop(window.lapses)
            self._release(window, hold_id)
        return window

    def _release(self, window: _Window, hold_id: str) -> None:
        amount, _ = window.holds.pop(hold_id, (0, 0))
        window.held -= amount  # lapsed: the total goes down at once

    def window(self, key: str, now: int) -> tuple[int, int, bool]:
        window = self._window(key, now)
        return (0, 0, False) if window is None else (window.spent, window.held, window.alerted)

    def put_window(self, key: str, spent: int, held: int, alerted: bool, expires: int) -> None:
        window = self._windows.setdefault(key, _Window())
        window.spent, window.held, window.alerted = spent, held, alerted
        window.expires = max(window.expires, expires)

    def add_hold(self, key: str, hold_id: str, amount: int, expires: int, window_expires: int) -> None:
        window = self._windows.setdefault(key, _Window())
        window.expires = max(window.expires, window_expires)
        window.holds[hold_id] = (amount, expires)
        window.held += amount
        heapq.heappush(window.lapses, (expires, hold_id))

    def drop_hold(self, key: str, hold_id: str, expires: int) -> int:
        window = self._windows.get(key)
        if window is None:
            return 0
        amount, _ = window.holds.pop(hold_id, (0, 0))  # its heap entry is skipped when it comes up...
        if len(window.lapses) > 2 * len(window.holds) + 64:  # ...or goes when the heap is rebuilt
            window.lapses = [(expires, hold_id) for hold_id, (_, expires) in window.holds.items()]
            heapq.heapify(window.lapses)
        return amount
