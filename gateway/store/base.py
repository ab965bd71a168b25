"""The one interface every piece of shared state goes through.

Keys are plain strings namespaced by their owner (`tenant:acme`, `apikey:<prefix>`, ...); values
are bytes (JSON documents, by convention). Every operation that two replicas could race on is
atomic in every backend: `add` (create if absent), `incr`, `delete`, `add_counts` (a batch of
counter increments, applied at most once), `admit` and `settle` (rate limits and budgets, all
checks of a request at once: gateway/store/limits.py). There is no read-modify-write
API on purpose: callers that need one get a dedicated atomic operation here instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from gateway.store.limits import Admission, Hold, LimitCheck, RateCheck, Settlement


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


WRITER_TTL_S = 7 * 24 * 3600.0  # `add_counts` remembers a writer's last batch this long after it
CountBatch = Mapping[str, Mapping[str, int]]  # counter hash key -> field -> amount to add


class StoreError(Exception):
    """The store cannot be reached or used; the message names the backend, never a password."""


def check_ttl(ttl_s: float | None) -> None:
    """Refuse a TTL that is not a positive number of seconds (a caller's bug, not a store failure)."""
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")


class Subscription(Protocol):
    """What `Store.subscribe` returns: an async iterator of messages that holds a resource until closed.

    Use it as `async with store.subscribe(channel) as messages: async for message in messages: ...`.
    Entering waits until the subscription is live, so everything published after that is delivered;
    leaving closes it. Iterated without `async with`, it goes live when the first `__anext__` starts,
    and the caller must `await messages.aclose()`. `aclose()` (of the subscription or of the store)
    ends the iteration; an unreachable store raises StoreError from `__anext__`.
    """

    def __aiter__(self) -> Subscription: ...

    async def __anext__(self) -> bytes: ...

    async def __aenter__(self) -> Subscription: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def aclose(self) -> None: ...


class Store(Protocol):
    url: str  # safe to show: credentials removed

    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Create or replace `key`; `ttl_s` > 0 makes it expire (None: never; else ValueError)."""
        ...

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Create `key` only if it does not exist (atomically); False if it already did."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove `key`; False if it did not exist."""
        ...

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every live (key, value) whose key starts with `prefix`, sorted by key."""
        ...

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Add `amount` to the integer at `key` (0 if absent) atomically and return the new value.

        `ttl_s` is applied when the counter is created, never extended by later increments, so a
        counter for a time window expires with its window. The value is stored as ASCII digits, so
        `get` returns e.g. b"42"; a value that is not an integer raises StoreError.
        """
        ...

    async def add_counts(self, writer: str, seq: int, counts: CountBatch) -> bool:
        """Add `counts[key][field]` to each integer field of the counter hashes: all or nothing, at most once.

        Counter hashes are a keyspace beside the plain keys (`get` and `scan` do not see them; in Redis
        they are hashes under the same prefix, so give them a prefix of their own, e.g. `ledger:`).
        A missing hash or field starts at 0. The batch is identified by (`writer`, `seq`): a writer
        numbers its batches 1, 2, 3... and sends them in order, retrying a failed one with the same
        `seq` before it sends the next. A batch whose `seq` is not above the writer's last applied one
        was applied already (its acknowledgement was lost): it changes nothing and returns False.
        A writer is forgotten WRITER_TTL_S after its last batch, so use a new writer id per process.
        """
        ...

    async def read_counts(self, keys: Sequence[str]) -> dict[str, dict[str, int]]:
        """Every field of each counter hash in `keys`; a hash without fields is left out."""
        ...

    async def admit(
        self, checks: Sequence[LimitCheck], *, hold_s: float = 660.0, now: float | None = None
    ) -> Admission:
        """Evaluate rate buckets and budget windows together; apply ALL of them if every one passes, else NONE.

        A `RateCheck` takes `cost` units from a GCRA bucket; a `BudgetCheck` holds `amount` nano-USD in its
        window for `hold_s` seconds (or until `settle`), so concurrent requests never overshoot the limit.
        One store operation (a Lua script, a transaction); a refused call writes nothing. `now` (epoch
        seconds, default the clock) is what every time is measured from. Keys must be distinct, and the
        limit state is a keyspace of its own beside the plain keys (see gateway/store/limits.py).
        """
        ...

    async def settle(
        self, hold: Hold | None, spend: int, corrections: Sequence[RateCheck] = (), *, now: float | None = None
    ) -> Settlement:
        """Release `hold` and add `spend` (nano-USD, >= 0) to each of its windows; charge each correction.

        A correction's `cost` is added to its bucket as is, negative for a refund (real tokens below the
        estimate). Call once per admitted hold: the spend counts even if the hold has lapsed meanwhile.
        One store operation. The result says which windows crossed their `alert_at` for the first time.
        """
        ...

    async def publish(self, channel: str, message: bytes) -> None:
        """Tell every subscriber of `channel`, in this process and in every other replica."""
        ...

    def subscribe(self, channel: str) -> Subscription:
        """Messages published to `channel` from now on, until the iterator is closed."""
        ...

    async def aclose(self) -> None:
        """Release connections and end open subscriptions; idempotent. Later calls reconnect."""
        ...
