"""The spend ledger: requests, tokens and cost per tenant, key, end user, model and UTC day.

The accounting stage calls `ledger.record(UsageRecord(...))` once per answered request (only the
attempt that answered: retries and fallbacks are the caller's business). Nothing is written there:
records are summed in memory per (tenant, key, user, model, day), and a background task writes the
sums in ONE store call (`Store.add_counts`: one Lua script in Redis, one transaction in SQLite)
every `flush_interval_s` (0.2 s), as soon as `max_batch` records are waiting, and on shutdown.

Storage: a counter hash per tenant and day, `ledger:<tenant>:<YYYY-MM-DD>`, with a field per
`<key>|<user>|<model>|<metric>` (each part escaped; no user is an empty part), plus an index hash
`ledger-tenants:<day>` of the tenants with usage that day. A range query reads one hash per tenant
and day in one round trip (two without a tenant: the index first). The counters live behind two
small generic Store methods rather than a ledger protocol of its own, because the atomic,
idempotent batch write is backend code (Lua, SQLite transactions) that belongs next to the
connections, and budgets can reuse it.

Nothing is counted twice: each Ledger is a writer with a random id that numbers its batches; a batch
whose write failed is retried, unchanged and with the same number, before any newer one, and the
store applies a number at most once, so a retry after a lost acknowledgement changes nothing.

Crash safety, decided: GROUP COMMIT. `record()` returns an awaitable that completes (True) once the
record's batch is committed to the store. Awaiting it hurries the flusher, which waits
`commit_delay_s` (10 ms) to gather concurrent requests and writes them together, so the store sees
at most one write per `commit_delay_s` per replica, never one per request. The caller chooses:
- durable: await it (with a timeout) before sending the response's last bytes. A SIGKILL then loses
  nothing a client received in full; the ledger can exceed what clients received only by responses
  whose batch committed but whose last bytes the kill cut off (answered and billed upstream anyway).
- fire-and-forget: do not await. A SIGKILL loses the records of the last flush interval (<= 0.2 s of
  traffic) and any batch being written; while the store is down, everything since (kept and retried).
A local append-only spool was rejected: it needs an fsync per record (or loses the same window), a
container's disk often dies with it, and replaying it needs this same idempotency anyway.
"Committed" means what the backend makes of a write: SQLite WAL (synchronous=NORMAL) survives a
crash of the process, not of the machine; Redis is as durable as its AOF or replicas are configured.

Measured with benchmarks/ledger_flush.py (2 shared vCPUs; table in docs/costs.md): `record()` costs
~1.5-2 us. One flush of 100 groups takes ~3-4 ms on SQLite (in its worker thread) and ~2-3 ms on
Redis; 1000 groups ~25-30 ms on either. A durable wait costs ~11 ms (p99 ~15-20) with one client and
~20-27 ms (p99 ~25-40) with 200 concurrent ones, at 40-90 store writes per second per replica.

Money: integer nano-dollars (10^-9 USD) everywhere inside; `usd_text` renders exactly 9 decimals.
A request without a price (`cost_nano` None) counts in `unpriced_requests` and adds nothing to the
cost, so a sum is never silently short: readers show both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from gateway.store import Store

logger = logging.getLogger("gateway.ledger")

_NANO = Decimal("1E-9")
_MAX_BACKOFF_S = 5.0
GROUP_FIELDS = ("tenant", "day", "key_id", "user", "model")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One answered request, as billed: the caller gives one per request, never one per attempt."""

    tenant: str
    key_id: str
    user: str | None  # the end user; "" counts as None
    model: str  # the gateway model that answered (after fallbacks)
    day: date  # UTC
    prompt_tokens: int  # includes cached_tokens, as in OpenAI's usage
    cached_tokens: int
    completion_tokens: int  # includes reasoning_tokens
    reasoning_tokens: int
    cost_nano: int | None  # None: the model has no price
    estimated: bool  # the gateway counted the tokens itself

    def __post_init__(self) -> None:
        counts = (self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.reasoning_tokens)
        if min(counts) < 0 or (self.cost_nano is not None and self.cost_nano < 0):
            raise ValueError(f"a usage record cannot hold negative tokens or cost: {self!r}")


@dataclass(slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0  # of the priced requests only
    unpriced_requests: int = 0
    estimated_requests: int = 0

    @property
    def priced_requests(self) -> int:
        return self.requests - self.unpriced_requests

    def add_record(self, rec: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += rec.prompt_tokens
        self.cached_tokens += rec.cached_tokens
        self.completion_tokens += rec.completion_tokens
        self.reasoning_tokens += rec.reasoning_tokens
        if rec.cost_nano is None:
            self.unpriced_requests += 1
        else:
            self.cost_nano += rec.cost_nano
        self.estimated_requests += rec.estimated

    def values(self) -> tuple[int, ...]:
        """The metrics in the order of METRICS."""
        return (
            self.requests,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            self.reasoning_tokens,
            self.cost_nano,
            self.unpriced_requests,
            self.estimated_requests,
        )

    def add(self, other: Totals) -> None:
        for name in METRICS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


METRICS = tuple(f.name for f in fields(Totals))


@dataclass(frozen=True, slots=True)
class LedgerRow:
    tenant: str
    day: date
    key_id: str
    user: str | None
    model: str
    totals: Totals


def nano_usd(cost: Decimal | None) -> int | None:
    """A cost in USD as whole nano-dollars (half-even), for `UsageRecord.cost_nano`."""
    return None if cost is None else int(cost.quantize(_NANO, rounding=ROUND_HALF_EVEN).scaleb(9))


def usd_text(nano: int) -> str:
    """Nano-dollars as exact decimal dollars with 9 places: 1234567 -> "0.001234567"."""
    sign, nano = ("-", -nano) if nano < 0 else ("", nano)
    return f"{sign}{nano // 10**9}.{nano % 10**9:09d}"


def _escape(part: str) -> str:
    if not part.isascii():  # a lone surrogate (JSON allows one in a JWT claim) cannot be stored: "?"
        part = part.encode("utf-8", "replace").decode("utf-8")
    return part.replace("%", "%25").replace("|", "%7C") if "%" in part or "|" in part else part


def _unescape(part: str) -> str:
    return part.replace("%7C", "|").replace("%25", "%")


def hash_key(tenant: str, day: date) -> str:
    return f"ledger:{tenant}:{day.isoformat()}"


def index_key(day: date) -> str:
    return f"ledger-tenants:{day.isoformat()}"


class _Batch:
    """Records summed per group until sealed with a number; then frozen as the store's increments."""

    __slots__ = ("committed", "counts", "groups", "hurry", "ok", "records", "seq")

    def __init__(self) -> None:
        self.groups: dict[tuple[str, date, str, str | None, str], Totals] = {}
        self.records = 0
        self.hurry = False
        self.seq = 0
        self.counts: dict[str, dict[str, int]] = {}
        self.ok = False
        self.committed = asyncio.Event()

    def add(self, rec: UsageRecord) -> None:
        group = (rec.tenant, rec.day, rec.key_id, rec.user or None, rec.model)
        totals = self.groups.get(group)
        if totals is None:
            totals = self.groups[group] = Totals()
        totals.add_record(rec)
        self.records += 1

    def seal(self, seq: int) -> None:
        self.seq = seq
        counts, indexes = self.counts, dict[str, dict[str, int]]()
        for (tenant, day, key_id, user, model), totals in self.groups.items():
            target = counts.get(key := hash_key(tenant, day))
            if target is None:
                target = counts[key] = {}
                indexes.setdefault(index_key(day), {})[tenant] = 0
            prefix = f"{_escape(key_id)}|{_escape(user or '')}|{_escape(model)}|"
            for name, value in zip(METRICS, totals.values(), strict=True):
                if value:  # each group is unique in a batch: its fields are new in `target`
                    target[prefix + name] = value
            indexes[index_key(day)][tenant] += totals.requests
        counts.update(indexes)
        self.groups = {}

    def finish(self, ok: bool) -> None:
        self.ok = ok
        self.committed.set()


class Committed:
    """What `record()` returns: await it for True once the record is in the store (False: lost at close)."""

    __slots__ = ("_batch", "_ledger")

    def __init__(self, ledger: Ledger, batch: _Batch) -> None:
        self._ledger, self._batch = ledger, batch

    def __await__(self) -> Generator[Any, None, bool]:
        self._ledger._hurry(self._batch)
        return self._wait().__await__()

    async def _wait(self) -> bool:
        await self._batch.committed.wait()
        return self._batch.ok


class Ledger:
    def __init__(
        self,
        store: Store,
        *,
        flush_interval_s: float = 0.2,
        max_batch: int = 1000,
        commit_delay_s: float = 0.01,
    ) -> None:
        self.store = store
        self.writer = uuid.uuid4().hex  # a new writer per process: its batch numbers start over
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.commit_delay_s = commit_delay_s
        self._seq = 0
        self._pending = _Batch()
        self._inflight: _Batch | None = None  # sealed, written at least once without an acknowledgement
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def record(self, rec: UsageRecord) -> Committed:
        """Count `rec` (no I/O); await the result to know that it is in the store."""
        if self._closed:
            logger.error("usage recorded after the ledger closed is lost: %r", rec)
            lost = _Batch()
            lost.finish(False)
            return Committed(self, lost)
        batch = self._pending
        batch.add(rec)
        if batch.records >= self.max_batch:
            self._wake.set()
        return Committed(self, batch)

    def _hurry(self, batch: _Batch) -> None:
        if batch is self._pending and not batch.hurry:
            batch.hurry = True
            self._wake.set()

    @property
    def pending_records(self) -> int:
        return self._pending.records + (self._inflight.records if self._inflight else 0)

    async def flush(self) -> None:
        """Write what was recorded so far (a failed batch first); StoreError leaves it to retry."""
        async with self._lock:
            if self._inflight is not None:
                await self._write(self._inflight)
            if self._pending.records:
                self._seq += 1
                self._inflight, self._pending = self._pending, _Batch()
                self._inflight.seal(self._seq)
                await self._write(self._inflight)

    async def _write(self, batch: _Batch) -> None:
        if not await self.store.add_counts(self.writer, batch.seq, batch.counts):
            logger.info(
                "ledger batch %s:%d was already in the store (a retry after a lost reply)", self.writer, batch.seq
            )
        self._inflight = None
        batch.finish(True)

    def start(self) -> None:
        """Start the background flusher (needs a running event loop)."""
        if self._task is None:
            self._closed = False
            self._task = asyncio.create_task(self._run(), name="ledger-flush")

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            if self._pending.hurry and self._pending.records < self.max_batch:
                await asyncio.sleep(self.commit_delay_s)  # gather the records of concurrent requests
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                failures += 1
                delay = min(self.flush_interval_s * 2**failures, _MAX_BACKOFF_S)
                logger.warning(
                    "ledger: %d records wait for the store, retry in %.1f s: %s", self.pending_records, delay, exc
                )
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def aclose(self, attempts: int = 3) -> None:
        """Stop the flusher and write everything left; what still cannot be written is logged as lost."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for attempt in range(attempts):
            try:
                await self.flush()
                return
            except Exception as exc:
                logger.warning("ledger: final flush failed (attempt %d of %d): %s", attempt + 1, attempts, exc)
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.2 * 2**attempt)
        lost = [batch for batch in (self._inflight, self._pending) if batch is not None and batch.records]
        logger.error("ledger: %d usage records could not be written and are lost", sum(b.records for b in lost))
        for batch in lost:
            batch.finish(False)
        self._inflight, self._pending = None, _Batch()

    async def read(self, tenants: Collection[str] | None, first: date, last: date) -> list[LedgerRow]:
        """Every row of `tenants` (None: all) from day `first` to `last`, both included, as the store has them."""
        days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
        if tenants is None:
            index = await self.store.read_counts([index_key(day) for day in days])
            pairs = [(tenant, day) for day in days for tenant in sorted(index.get(index_key(day), ()))]
        else:
            pairs = [(tenant, day) for day in days for tenant in sorted(set(tenants))]
        hashes = await self.store.read_counts([hash_key(tenant, day) for tenant, day in pairs])
        rows = []
        for tenant, day in pairs:
            for (key_id, user, model), totals in _parse(hashes.get(hash_key(tenant, day), {})).items():
                rows.append(LedgerRow(tenant, day, key_id, user, model, totals))
        return rows


def _parse(counts: dict[str, int]) -> dict[tuple[str, str | None, str], Totals]:
    groups: dict[tuple[str, str | None, str], Totals] = {}
    for name, value in counts.items():
        parts = name.split("|")
        if len(parts) != 4 or parts[3] not in METRICS:
            continue  # written by a newer version: ignored, not misread
        key_id, user, model = (_unescape(part) for part in parts[:3])
        totals = groups.setdefault((key_id, user or None, model), Totals())
        setattr(totals, parts[3], getattr(totals, parts[3]) + value)
    return groups


GroupKey = tuple[str | date | None, ...]


def aggregate(rows: Iterable[LedgerRow], by: Sequence[str]) -> list[tuple[GroupKey, Totals]]:
    """Sum `rows` per value of the GROUP_FIELDS named in `by`, sorted by those values (None first)."""
    getters: list[Callable[[LedgerRow], str | date | None]] = [_getter(name) for name in by]
    groups: dict[GroupKey, Totals] = {}
    for row in rows:
        key = tuple(get(row) for get in getters)
        totals = groups.get(key)
        if totals is None:
            totals = groups[key] = Totals()
        totals.add(row.totals)
    return sorted(groups.items(), key=lambda item: tuple((v is not None, str(v or "")) for v in item[0]))


def _getter(name: str) -> Callable[[LedgerRow], str | date | None]:
    if name not in GROUP_FIELDS:
        raise ValueError(f"cannot group by {name!r}; choose from {', '.join(GROUP_FIELDS)}")
    return lambda row: getattr(row, name)
