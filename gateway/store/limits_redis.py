"""The limits of gateway/store/limits.py in Redis: one Lua script that runs a batch of `admit`s and `settle`s.

Keys (under the store's prefix): a bucket is a hash {l: level, t: at} that expires when the bucket
is full again; a window is a hash {s: spent, r: held, a: alerted} that expires with the window, and
`<key>:holds`, a ZSET of "amount:id" members scored by their expiry. `r` is the running total of
the ZSET's amounts: a script that meets lapsed members (ZRANGEBYSCORE -inf now) subtracts and
removes them, and a missing ZSET means nothing is held. So a check is O(log n + lapsed), and a
crashed replica's holds stop counting once they lapse, with no sweeper. Hashes, not strings, so
`get`, `scan` and MGET never see limit state. The arithmetic mirrors limits.py exactly: integers
below 2**53, and `idiv` is an exact floor division on doubles. Times are the callers' `now`; a bucket
and a holds ZSET expire in Redis SKEW (5 s) after their end by that clock, so a replica whose clock
runs behind Redis's never sees state vanish before it has drained or lapsed.

The calls a replica coalesced (gateway/store/coalesce.py) go as ONE EVALSHA of BATCH_SCRIPT, which
runs them in order. KEYS lists each key once, however many calls use it (under load they mostly
share a tenant's keys), and ARGV[1] is one JSON array of the calls, each naming its keys by index:
what the client encodes and parses per call is a few numbers, not ~50 arguments and ~30 replies,
which were most of a call's cost. A script runs atomically in Redis, so every replica sees one
order of calls, and each call's checks are evaluated and applied together; nothing is read and then
written from Python. Each call runs under `pcall`, so a call that fails (a key of the wrong type)
gets its own error reply and the others go on; like any Redis script, it keeps what it wrote before
the error. (Redis Cluster would need a batch's keys in one hash slot: not supported, like the rest.)
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gateway.store.limits import (
    Admission,
    AdmitCall,
    BudgetCheck,
    BudgetResult,
    Hold,
    LimitCall,
    LimitCheck,
    RateCheck,
    RateResult,
    Settlement,
)

BATCH_SCRIPT = """
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

-- A call's keys K (rate keys, then (window, holds) pairs), and its numbers P: (limit, period_ms,
-- capacity, cost) per rate, then per window (limit, amount, expiry) to admit, (amount, expiry,
-- alert_at or -1) to settle. Each fills `out` with the integers of its reply.
local function admit(K, now, hold_id, hold_exp, nr, P, out)
  local nb = (#K - nr) / 2
  local passed, rates, budgets = true, {}, {}
  for i = 1, nr do
    local a = 4 * (i - 1)
    local limit, period, capacity, cost = P[a + 1], P[a + 2], P[a + 3], P[a + 4]
    local level, at = drained(K[i], limit, now)
    local after = level + cost * period
    if after > capacity then passed = false end
    rates[i] = {limit, period, capacity, cost, level, at, after}
  end
  for j = 1, nb do
    local a = 4 * nr + 3 * (j - 1)
    local limit, amount, expires = P[a + 1], P[a + 2], P[a + 3]
    if expires < hold_exp then expires = hold_exp end
    local spent, held = window(K[nr + 2 * j - 1], K[nr + 2 * j], now, expires - now)
    local alone = spent < limit and spent + held + amount <= limit
    if not alone then passed = false end
    budgets[j] = {amount, int(amount) .. ':' .. hold_id, expires, spent, held, alone}
  end
  out[1] = passed and 1 or 0
  for i = 1, nr do
    local limit, period, capacity, cost, level, at, after = unpack(rates[i])
    local n = #out
    if passed then
      if cost ~= 0 then put_bucket(K[i], after, at, limit, now) end
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
      local k, h = K[nr + 2 * j - 1], K[nr + 2 * j]
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
end

local function settle(K, now, hold_id, spend, nr, P, out)
  local nb = (#K - nr) / 2
  for i = 1, nr do
    local a = 4 * (i - 1)
    local limit, period, capacity, cost = P[a + 1], P[a + 2], P[a + 3], P[a + 4]
    local level, at, stored = drained(K[i], limit, now)
    level = level + cost * period
    if level < 0 then level = 0 end
    if level > 2 * capacity then level = 2 * capacity end
    if level > 0 or stored then put_bucket(K[i], level, at, limit, now) end
  end
  for j = 1, nb do
    local a = 4 * nr + 3 * (j - 1)
    local k, h = K[nr + 2 * j - 1], K[nr + 2 * j]
    local amount, alert = P[a + 1], P[a + 3]
    local ttl = P[a + 2] - now
    if ttl < 1 then ttl = 1 end
    local spent, held, alerted = window(k, h, now, ttl)
    local wrote = false
    if amount > 0 and redis.call('ZREM', h, int(amount) .. ':' .. hold_id) == 1 then
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
end

-- ARGV[1]: the calls, [[1 (admit) or 2 (settle), [key indices], now, hold id, hold expiry or spend,
-- #rates, [numbers]], ...]. Returns one string per call: its integers, or "!" and its error.
local replies = {}
for c, call in ipairs(cjson.decode(ARGV[1])) do
  local K = {}
  for i, k in ipairs(call[2]) do K[i] = KEYS[k] end
  local out = {}
  local ok, err = pcall(call[1] == 1 and admit or settle, K, call[3], call[4], call[5], call[6], call[7], out)
  if ok then
    for i = 1, #out do out[i] = int(out[i]) end
    replies[c] = table.concat(out, ' ')
  else
    if type(err) == 'table' then err = err.err end
    replies[c] = '!' .. tostring(err)
  end
end
return replies
"""


class _Keys:
    """KEYS of one batch: each key once, named by its 1-based index."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.keys: list[str] = []
        self._index: dict[str, int] = {}

    def at(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            self.keys.append(self.prefix + key)
            index = self._index[key] = len(self.keys)
        return index


def _rate_args(check: RateCheck) -> tuple[int, int, int, int]:
    return check.limit, check.period_ms, check.capacity, check.cost


def _admit_call(keys: _Keys, call: AdmitCall) -> list[object]:
    indices: list[int] = []
    numbers: list[int] = []
    for check in call.checks:
        if isinstance(check, RateCheck):
            indices.append(keys.at(check.key))
            numbers += _rate_args(check)
    rates = len(indices)
    for check in call.checks:
        if isinstance(check, BudgetCheck):
            indices += (keys.at(check.key), keys.at(check.key + ":holds"))
            numbers += (check.limit, check.amount, check.expires_ms)
    return [1, indices, call.now, call.hold_id, call.now + call.hold_ms, rates, numbers]


def _settle_call(keys: _Keys, call: LimitCall) -> list[object]:
    assert not isinstance(call, AdmitCall)
    hold = call.hold
    indices = [keys.at(check.key) for check in call.corrections]
    numbers: list[int] = []
    for rate in call.corrections:
        numbers += _rate_args(rate)
    for budget in hold.budgets if hold is not None else ():
        indices += (keys.at(budget.key), keys.at(budget.key + ":holds"))
        numbers += (budget.amount, budget.expires_ms, -1 if budget.alert_at is None else budget.alert_at)
    hold_id = "" if hold is None else hold.id
    return [2, indices, call.now, hold_id, call.spend, len(call.corrections), numbers]


def batch_call(prefix: str, calls: Sequence[LimitCall]) -> tuple[list[str], list[bytes]]:
    """KEYS and ARGV of BATCH_SCRIPT for `calls`, in order."""
    keys = _Keys(prefix)
    encoded = [_admit_call(keys, call) if isinstance(call, AdmitCall) else _settle_call(keys, call) for call in calls]
    return keys.keys, [orjson.dumps(encoded)]


class ScriptFailed(Exception):
    """One call of a batch failed in Redis (its message is Redis's)."""


def outcome(reply: bytes | str, call: LimitCall) -> Admission | Settlement:
    """One call's part of BATCH_SCRIPT's reply; ScriptFailed if it failed."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    if text.startswith("!"):
        raise ScriptFailed(text[1:])
    values = [int(value) for value in text.split()]
    if isinstance(call, AdmitCall):
        return admission(values, call.checks, call.now, call.hold_id, call.hold_ms)
    return settlement(values, call.hold)


def admission(values: list[int], checks: Sequence[LimitCheck], now: int, hold_id: str, hold_ms: int) -> Admission:
    """An admit's integers, back in the order of `checks`."""
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


def settlement(values: list[int], hold: Hold | None) -> Settlement:
    budgets = hold.budgets if hold is not None else ()
    spent = tuple(values[0::2])
    alerts = tuple(budget for budget, crossed in zip(budgets, values[1::2], strict=True) if crossed)
    return Settlement(spent, alerts)
