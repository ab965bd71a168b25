"""Atomic limits in the store: GCRA rate buckets and budget windows with self-expiring holds.

`Store.admit(checks)` evaluates every check of a request together and applies all of them or none,
in ONE store operation (memory: no await in between; SQLite: inside one BEGIN IMMEDIATE transaction;
Redis: one Lua script). `Store.settle(hold, spend)` turns the request's holds into real spend.
This module holds the contract's types and the reference algorithm, which memory:// and
sqlite:/// run over their own storage; gateway/store/limits_redis.py is the same arithmetic in Lua.

Coalescing (gateway/store/coalesce.py): SQLite and Redis queue the `AdmitCall`s and `SettleCall`s
issued in one event-loop iteration and run them together, in call order: SQLite in one transaction
over a cache that reads each row once and writes it once (limits_sqlite.py); Redis in one script
call (limits_redis.py). Each call's checks stay atomic, and each call's result is exactly what it
would be had the calls run one after another: callers see no difference but the cost, one store
round trip per batch.

Everything is an integer, so every backend computes the same result to the unit: time in ms since
the epoch, money in nano-USD. All values stay below 2**53, where Lua's doubles are exact.

Rate bucket (GCRA, kept as a leaky bucket): `limit` units per `period`, at most `burst` at once.
The state is (level, at): the level, in units x period_ms, as of `at` ms; it drains by `limit` per
ms, and a call of `cost` units adds cost x period_ms. Admitted iff the new level stays within
burst x period_ms, i.e. no window of length d ever admits more than burst + limit x d / period
units. Scaling the level by period_ms keeps the arithmetic exact for any limit (a TAT in ms could
not represent one unit of a 150M-tokens-per-minute bucket) and lets an operator change `limit`
without invalidating the stored level. The key expires when the bucket is full again, so idle
buckets cost nothing. A settlement's correction may leave the bucket in debt (a request used more
tokens than estimated), by one more burst at most. Replicas use their own `now`: a clock ahead by
d ms can admit d ms of extra rate at most (`at` never moves backwards).

Budget window: `spent` plus the live holds of requests in flight. A check passes iff
spent < limit and spent + held + amount <= limit, so concurrent requests cannot overshoot by more
than their actual cost exceeding their hold. A hold lives `hold_s` (the longest a request can
take); a replica that crashes leaves holds that stop counting when they lapse, with no sweeper.
Every backend keeps a window's held total beside its holds ordered by expiry (a heap, a SQLite
table keyed (window, expiry, id), a Redis ZSET) and subtracts the lapsed ones when a check meets
them: O(log n + lapsed) whatever the number of requests in flight. A window's counters outlive
its holds. Its alert threshold is crossed by a settlement, at most once per window: holds are
worst cases, so crossing on them would alert on spend that never happens.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

MAX_INT = 2**53  # exact in Lua's doubles


@dataclass(frozen=True, slots=True)
class RateCheck:
    """A GCRA bucket: `limit` units per `period_s`, at most `burst` (None: `limit`) at once.

    In `admit`, the call takes `cost` units (>= 0; 0 only reads). In `settle`'s corrections, `cost` is
    the difference between the real and the estimated units, which may be negative (a refund).
    """

    key: str
    limit: int
    cost: int = 1
    period_s: float = 60.0
    burst: int | None = None
    period_ms: int = field(init=False, repr=False, compare=False)
    capacity: int = field(init=False, repr=False, compare=False)  # the most the level may reach

    def __post_init__(self) -> None:
        period_ms = max(1, round(self.period_s * 1000))
        object.__setattr__(self, "period_ms", period_ms)
        object.__setattr__(self, "capacity", (self.burst or self.limit) * period_ms)


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """A spend window: `limit` nano-USD; this call holds `amount` (its worst case) until settled or lapsed.

    `expires_at` (epoch seconds) is when the window's counters may go: its end plus a grace long
    enough for late settlements and for reading it afterwards. `alert_at` (nano-USD) is the soft
    threshold whose first crossing in the window `settle` reports.
    """

    key: str
    limit: int
    amount: int
    expires_at: float
    alert_at: int | None = None
    expires_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expires_ms", math.ceil(self.expires_at * 1000))


LimitCheck = RateCheck | BudgetCheck


@dataclass(frozen=True, slots=True)
class RateResult:
    """A bucket after the call (admitted) or as it stands (refused: nothing was taken)."""

    allowed: bool  # this check alone would pass
    remaining: int  # whole units the bucket could take now
    reset_ms: int  # until the bucket is full again
    retry_after_ms: int | None  # refused: when the same call would pass; None if it passed or never can


@dataclass(frozen=True, slots=True)
class BudgetResult:
    allowed: bool  # this check alone would pass
    spent: int  # settled spend in the window, nano-USD
    held: int  # held by requests in flight, including this call's amount if admitted


@dataclass(frozen=True, slots=True)
class Hold:
    """What an admitted call holds; give it to `settle` exactly once."""

    id: str
    budgets: tuple[BudgetCheck, ...]
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool  # every check passed, and every one was applied; else none was
    results: tuple[RateResult | BudgetResult, ...]  # one per check, in order
    hold: Hold | None  # admitted with budget checks: what to settle


@dataclass(frozen=True, slots=True)
class Settlement:
    spent: tuple[int, ...]  # each window's spend after this settlement, in `hold.budgets` order
    alerts: tuple[BudgetCheck, ...]  # windows whose spend reached `alert_at` for the first time


def now_ms(now: float | None) -> int:
    return math.floor((time.time() if now is None else now) * 1000)


def hold_ms(hold_s: float) -> int:
    return max(1, round(hold_s * 1000))


class _HoldIds:
    """A random per-process prefix (64 bits, drawn once) and a counter: unique across processes and
    replicas, without a system call per hold. A forked child draws a prefix of its own."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)  # fixed length, so prefix + counter never reads as another pair
        self.counter = itertools.count(1)


_hold_ids = _HoldIds()
os.register_at_fork(after_in_child=_hold_ids.reseed)


def new_hold_id() -> str:
    return f"{_hold_ids.prefix}{next(_hold_ids.counter):x}"


@dataclass(frozen=True, slots=True)
class AdmitCall:
    """`Store.admit`, validated and with its times resolved, as a batching backend queues it."""

    checks: Sequence[LimitCheck]
    now: int  # ms
    hold_id: str
    hold_ms: int


@dataclass(frozen=True, slots=True)
class SettleCall:
    """`Store.settle`, validated and with its time resolved."""

    hold: Hold | None
    spend: int
    corrections: Sequence[RateCheck]
    now: int  # ms


LimitCall = AdmitCall | SettleCall


def check_admit(checks: Sequence[LimitCheck], hold_s: float) -> None:
    """Refuse what no backend could apply exactly (a caller's bug): ValueError."""
    if not hold_s > 0:
        raise ValueError(f"hold_s must be a positive number of seconds, got {hold_s!r}")
    keys = [check.key for check in checks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"each check needs a key of its own, got {keys}")
    for check in checks:
        if isinstance(check, RateCheck):
            _check_rate(check, min_cost=0)
        elif not (0 <= check.amount < MAX_INT and 0 < check.limit < MAX_INT):
            raise ValueError(f"budget {check.key!r}: limit must be in 1..2**53, amount in 0..2**53, got {check}")


def check_settle(hold: Hold | None, spend: int, corrections: Sequence[RateCheck]) -> None:
    if not 0 <= spend < MAX_INT:
        raise ValueError(f"spend must be in 0..2**53 nano-USD, got {spend}")
    keys = [check.key for check in corrections]
    if len(set(keys)) != len(keys):
        raise ValueError(f"each correction needs a key of its own, got {keys}")
    for check in corrections:
        _check_rate(check, min_cost=-MAX_INT)


def _check_rate(check: RateCheck, min_cost: int) -> None:
    burst = check.burst or check.limit
    if not (check.limit > 0 and burst > 0 and check.period_s > 0 and min_cost <= check.cost):
        raise ValueError(f"rate {check.key!r}: limit, burst and period must be positive, cost >= {min_cost}: {check}")
    if max(2 * burst, abs(check.cost)) * check.period_ms >= MAX_INT or check.limit >= MAX_INT:
        raise ValueError(f"rate {check.key!r}: units x period_ms must stay below 2**53: {check}")


# --- the reference algorithm, over any storage that runs it atomically -------------------------------


class LimitState(Protocol):
    """Storage for the reference algorithm, used inside one atomic section. Times in ms."""

    def bucket(self, key: str, now: int) -> tuple[int, int] | None:
        """(level, at) of a live bucket."""
        ...

    def put_bucket(self, key: str, level: int, at: int, expires: int) -> None: ...

    def window(self, key: str, now: int) -> tuple[int, int, bool]:
        """(spent, held by live holds, alerted) of a window; (0, 0, False) if absent or expired."""
        ...

    def put_window(self, key: str, spent: int, held: int, alerted: bool, expires: int) -> None: ...

    def add_hold(self, key: str, hold_id: str, amount: int, expires: int, window_expires: int) -> None:
        """Record the hold and add `amount` to the window's held total; the window lives to `window_expires`."""
        ...

    def drop_hold(self, key: str, hold_id: str, expires: int) -> int:
        """Forget the hold and return its amount (0 if already gone), leaving the held total to `put_window`."""
        ...


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _drained(check: RateCheck, state: tuple[int, int] | None, now: int) -> tuple[int, int]:
    """The bucket's (level, at) at `now`: drained by `limit` per ms since `at`, never below 0."""
    level, at = state or (0, now)
    if now > at:
        level, at = max(0, level - (now - at) * check.limit), now
    return level, at


def _put_bucket(state: LimitState, check: RateCheck, level: int, at: int) -> None:
    state.put_bucket(check.key, level, at, at + max(1, _ceil_div(level, check.limit)))


def _rate_result(check: RateCheck, level: int, after: int, applied: bool) -> RateResult:
    capacity, period = check.capacity, check.period_ms
    if applied:
        return RateResult(True, (capacity - after) // period, _ceil_div(after, check.limit), None)
    retry = None
    if after > capacity and check.cost * period <= capacity:
        retry = _ceil_div(after - capacity, check.limit)
    return RateResult(after <= capacity, max(0, capacity - level) // period, _ceil_div(level, check.limit), retry)


def admit_on(state: LimitState, checks: Sequence[LimitCheck], now: int, hold_id: str, hold_ms: int) -> Admission:
    """Evaluate every check on the state at `now`; if all pass, apply all (else nothing)."""
    found: list[tuple[int, int, int]] = []  # rate: (level, at, level after the call); budget: (spent, held, 0)
    alone: list[bool] = []  # whether each check would pass by itself
    for check in checks:
        if isinstance(check, RateCheck):
            level, at = _drained(check, state.bucket(check.key, now), now)
            found.append((level, at, level + check.cost * check.period_ms))
            alone.append(found[-1][2] <= check.capacity)
        else:
            spent, held, _ = state.window(check.key, now)
            found.append((spent, held, 0))
            alone.append(spent < check.limit and spent + held + check.amount <= check.limit)
    passed = all(alone)
    results: list[RateResult | BudgetResult] = []
    for check, (first, second, after), ok in zip(checks, found, alone, strict=True):
        if isinstance(check, RateCheck):
            results.append(_rate_result(check, first, after, passed))
            if passed and check.cost:
                _put_bucket(state, check, after, second)
        else:
            results.append(BudgetResult(ok, first, second + check.amount if passed else second))
            if passed and check.amount:
                state.add_hold(check.key, hold_id, check.amount, now + hold_ms, max(now + hold_ms, check.expires_ms))
    budgets = tuple(check for check in checks if isinstance(check, BudgetCheck))
    hold = Hold(hold_id, budgets, now + hold_ms) if passed and budgets else None
    return Admission(passed, tuple(results), hold)


def settle_on(
    state: LimitState, hold: Hold | None, spend: int, corrections: Sequence[RateCheck], now: int
) -> Settlement:
    """Charge each correction's cost to its bucket; release the hold and add `spend` to each of its windows."""
    for check in corrections:
        stored = state.bucket(check.key, now)
        level, at = _drained(check, stored, now)
        level = min(max(0, level + check.cost * check.period_ms), 2 * check.capacity)
        if level or stored is not None:
            _put_bucket(state, check, level, at)
    spent_after: list[int] = []
    alerts: list[BudgetCheck] = []
    for budget in hold.budgets if hold is not None else ():
        released = state.drop_hold(budget.key, hold.id, hold.expires_ms) if budget.amount and hold else 0
        spent, held, alerted = state.window(budget.key, now)
        spent += spend
        crossed = budget.alert_at is not None and not alerted and spent >= budget.alert_at
        if released or spend or crossed:
            expires = max(budget.expires_ms, now + 1)
            state.put_window(budget.key, spent, max(0, held - released), alerted or crossed, expires)
        spent_after.append(spent)
        if crossed:
            alerts.append(budget)
    return Settlement(tuple(spent_after), tuple(alerts))


def apply_on(state: LimitState, call: LimitCall) -> Admission | Settlement:
    if isinstance(call, AdmitCall):
        return admit_on(state, call.checks, call.now, call.hold_id, call.hold_ms)
    return settle_on(state, call.hold, call.spend, call.corrections, call.now)
