"""The limits of gateway/store/limits.py in Redis: one Lua script for `admit`, one for `settle`.

Keys (under the store's prefix): a bucket is a hash {l: level, t: at} that expires when the bucket
is full again; a window is a hash {s: spent, r: held, a: alerted} that expires with the window, and
`<key>:holds`, a ZSET of "amount:id" members scored by their expiry. `r` is the running total of
the ZSET's amounts: a script that meets lapsed members (ZRANGEBYSCORE -inf now) subtracts and
removes them, and a missing ZSET means nothing is held. So a check is O(log n + lapsed), and a
crashed replica's holds stop counting once they lapse, with no sweeper. Hashes, not strings, so
`get`, `scan` and MGET never see limit state. The arithmetic mirrors limits.py exactly: integers
below 2**53, and `idiv` is an exact floor division on doubles. Times are the callers' `now`; a bucket
and a holds ZSET expire in Redis SKEW (5 s) after their end by that clock, so a replica whose clock
runs behind Redis's never sees state vanish before it has drained or lapsed. Each script runs atomically in
Redis, so every replica sees one order of calls; nothing is read and then written from Python.
(Redis Cluster would need the keys of one call in one hash slot: not supported, like the rest.)
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store.limits import (
    Admission,
    BudgetCheck,
    BudgetResult,
    Hold,
    LimitCheck,
    RateCheck,
    RateResult,
    Settlement,
)

_COMMON = """
local SKEW = 5000
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end
local function int(x) return string.format('%.0f', x) end
local function touch(key, ttl)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ttl) end
end
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
local function drained(key, limit, now)
  local s = redis.call('HMGET', key, 'l', 't')
  local level, at = tonumber(s[1]) or 0, tonumber(s[2]) or now
  if now > at then
    level = level - (now - at) * limit
    if level < 0 then level = 0 end
    at = now
  end
  return level, at, s[1] ~= false
end
local function put_bucket(key, level, at, limit, now)
  local full = cdiv(level, limit)
  if full < 1 then full = 1 end
  redis.call('HSET', key, 'l', int(level), 't', int(at))
  redis.call('PEXPIRE', key, at + full - now + SKEW)
end
local function window(k, h, now, ttl)
  local w = redis.call('HMGET', k, 's', 'r', 'a')
  local held = 0
  local first = redis.call('ZRANGE', h, 0, 0, 'WITHSCORES')
  if #first > 0 then
    held = tonumber(w[2]) or 0
  end
  if #first > 0 and tonumber(first[2]) <= now then
    local lapsed = redis.call('ZRANGEBYSCORE', h, '-inf', now)
    if #lapsed > 0 then
      for _, m in ipairs(lapsed) do held = held - tonumber(string.match(m, '^(%d+):')) end
      if held < 0 then held = 0 end
      redis.call('ZREMRANGEBYSCORE', h, '-inf', now)
      redis.call('HSET', k, 'r', int(held))
      touch(k, ttl)
    end
  end
  return tonumber(w[1]) or 0, held, w[3] ~= false
end
local now, hold_id, nr = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[4])
local nb = (#KEYS - nr) / 2
local out = {}
"""
# KEYS: rate keys, then (window, holds) pairs. ARGV: now, hold id, hold expiry, #rates, then
# (limit, period_ms, capacity, cost) per rate, then (limit, amount, member, expiry) per window.
# Returns: passed, (alone, remaining, reset, retry or -1) per rate, (alone, spent, held) per window.
_ADMIT = (
    _COMMON
    + """
local hold_exp = tonumber(ARGV[3])
local passed, rates, budgets = true, {}, {}
for i = 1, nr do
  local a = 4 + 4 * (i - 1)
  local limit, period, capacity, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  local level, at = drained(KEYS[i], limit, now)
  local after = level + cost * period
  if after > capacity then passed = false end
  rates[i] = {limit, period, capacity, cost, level, at, after}
end
for j = 1, nb do
  local a = 4 + 4 * nr + 4 * (j - 1)
  local limit, amount, expires = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  if expires < hold_exp then expires = hold_exp end
  local spent, held = window(KEYS[nr + 2 * j - 1], KEYS[nr + 2 * j], now, expires - now)
  local alone = spent < limit and spent + held + amount <= limit
  if not alone then passed = false end
  budgets[j] = {amount, ARGV[a + 3], expires, spent, held, alone}
end
out[1] = passed and 1 or 0
for i = 1, nr do
  local limit, period, capacity, cost, level, at, after = unpack(rates[i])
  local n = #out
  if passed then
    if cost ~= 0 then put_bucket(KEYS[i], after, at, limit, now) end
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, idiv(capacity - after, period), cdiv(after, limit), -1
  else
    local retry, free = -1, capacity - level
    if after > capacity and cost * period <= capacity then retry = cdiv(after - capacity, limit) end
    if free < 0 then free = 0 end
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = after <= capacity and 1 or 0, idiv(free, period),
      cdiv(level, limit), retry
  end
end
for j = 1, nb do
  local amount, member, expires, spent, held, alone = unpack(budgets[j])
  if passed and amount > 0 then
    local k, h = KEYS[nr + 2 * j - 1], KEYS[nr + 2 * j]
    redis.call('ZADD', h, hold_exp, member)
    extend(h, hold_exp - now + SKEW)
    held = held + amount
    redis.call('HSET', k, 'r', int(held))
    local ttl = redis.call('PTTL', k)
    local want = ttl
    if want < 0 then want = expires - now end
    if want < hold_exp - now + SKEW then want = hold_exp - now + SKEW end
    if want ~= ttl then redis.call('PEXPIRE', k, want) end
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3] = alone and 1 or 0, spent, held
end
return out
"""
)
# KEYS and ARGV as for admit, with the spend in place of the hold expiry and (amount, member,
# expiry, alert_at or -1) per window. Returns (spent, crossed) per window.
_SETTLE = (
    _COMMON
    + """
local spend = tonumber(ARGV[3])
for i = 1, nr do
  local a = 4 + 4 * (i - 1)
  local limit, period, capacity, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  local level, at, stored = drained(KEYS[i], limit, now)
  level = level + cost * period
  if level < 0 then level = 0 end
  if level > 2 * capacity then level = 2 * capacity end
  if level > 0 or stored then put_bucket(KEYS[i], level, at, limit, now) end
end
for j = 1, nb do
  local a = 4 + 4 * nr + 4 * (j - 1)
  local k, h = KEYS[nr + 2 * j - 1], KEYS[nr + 2 * j]
  local amount, member, alert = tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 4])
  local ttl = tonumber(ARGV[a + 3]) - now
  if ttl < 1 then ttl = 1 end
  local spent, held, alerted = window(k, h, now, ttl)
  local wrote = false
  if amount > 0 and redis.call('ZREM', h, member) == 1 then
    held = held - amount
    if held < 0 then held = 0 end
    redis.call('HSET', k, 'r', int(held))
    wrote = true
  end
  spent = spent + spend
  local crossed = alert >= 0 and not alerted and spent >= alert
  if spend > 0 then redis.call('HSET', k, 's', int(spent)); wrote = true end
  if crossed then redis.call('HSET', k, 'a', 1); wrote = true end
  if wrote then touch(k, ttl) end
  local n = #out
  out[n + 1], out[n + 2] = spent, crossed and 1 or 0
end
return out
"""
)
ADMIT_SCRIPT, SETTLE_SCRIPT = _ADMIT, _SETTLE


def _rate_args(check: RateCheck) -> list[int]:
    return [check.limit, check.period_ms, check.capacity, check.cost]


def _member(check: BudgetCheck, hold_id: str) -> str:
    return f"{check.amount}:{hold_id}"


def admit_call(
    prefix: str, checks: Sequence[LimitCheck], now: int, hold_id: str, hold_ms: int
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of ADMIT_SCRIPT."""
    rates = [check for check in checks if isinstance(check, RateCheck)]
    budgets = [check for check in checks if isinstance(check, BudgetCheck)]
    keys = [prefix + check.key for check in rates]
    args: list[str | int] = [now, hold_id, now + hold_ms, len(rates)]
    for rate in rates:
        args += _rate_args(rate)
    for budget in budgets:
        keys += (prefix + budget.key, prefix + budget.key + ":holds")
        args += (budget.limit, budget.amount, _member(budget, hold_id), budget.expires_ms)
    return keys, args


def admission(reply: Sequence[int], checks: Sequence[LimitCheck], now: int, hold_id: str, hold_ms: int) -> Admission:
    """ADMIT_SCRIPT's reply, back in the order of `checks`."""
    values = [int(value) for value in reply]
    passed = bool(values[0])
    rate_at = 1
    budget_at = 1 + 4 * sum(isinstance(check, RateCheck) for check in checks)
    results: list[RateResult | BudgetResult] = []
    for check in checks:
        if isinstance(check, RateCheck):
            alone, remaining, reset, retry = values[rate_at : rate_at + 4]
            results.append(RateResult(bool(alone), remaining, reset, None if retry < 0 else retry))
            rate_at += 4
        else:
            alone, spent, held = values[budget_at : budget_at + 3]
            results.append(BudgetResult(bool(alone), spent, held))
            budget_at += 3
    budgets = tuple(check for check in checks if isinstance(check, BudgetCheck))
    hold = Hold(hold_id, budgets, now + hold_ms) if passed and budgets else None
    return Admission(passed, tuple(results), hold)


def settle_call(
    prefix: str, hold: Hold | None, spend: int, corrections: Sequence[RateCheck], now: int
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of SETTLE_SCRIPT."""
    keys = [prefix + check.key for check in corrections]
    args: list[str | int] = [now, "" if hold is None else hold.id, spend, len(corrections)]
    for rate in corrections:
        args += _rate_args(rate)
    for budget in hold.budgets if hold is not None else ():
        keys += (prefix + budget.key, prefix + budget.key + ":holds")
        alert = -1 if budget.alert_at is None else budget.alert_at
        args += (budget.amount, _member(budget, hold.id if hold else ""), budget.expires_ms, alert)
    return keys, args


def settlement(reply: Sequence[int], hold: Hold | None) -> Settlement:
    values = [int(value) for value in reply]
    budgets = hold.budgets if hold is not None else ()
    spent = tuple(values[0::2])
    alerts = tuple(budget for budget, crossed in zip(budgets, values[1::2], strict=True) if crossed)
    return Settlement(spent, alerts)
