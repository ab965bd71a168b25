"""Prices by model and UTC day, and the exact cost of one request's usage.

Units: a price is USD per 1M tokens, a cost is USD, both `Decimal`. Decimal rather than integer
nano-dollars because prices are written as decimal dollars (0.075, 0.005 per 1M tokens) and are kept
exactly as written, with no unit to convert and no scale that a future price could outgrow. The
schema allows at most 6 decimal places per 1M tokens, so every cost is a whole number of picodollars
(10^-12 USD): all arithmetic runs in a context that raises instead of rounding, and each cost is
quantized to that unit. Sums of costs are therefore exact and additive, in any order.

Usage follows OpenAI's `usage` object: `prompt_tokens` includes the cached tokens
(`prompt_tokens_details.cached_tokens`), which are billed at `cached_input` and the rest at `input`;
`completion_tokens` includes the reasoning tokens (`completion_tokens_details.reasoning_tokens`),
and all of them are billed at `output`.

Everything is resolved once, at start-up (`PriceBook.from_config`); the request path does dict lookups.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, Rounded
from pathlib import Path

from gateway.config.loader import load_prices_file
from gateway.config.schema import GatewayConfig, PriceEntry

# Every operation is exact or raises: 60 digits hold any total a ledger will meet.
_EXACT = Context(prec=60, traps=[Inexact, Rounded, InvalidOperation, Overflow])
COST_QUANTUM = Decimal("1E-12")  # one picodollar; every cost is a whole multiple of it
_MAX_PRICE_DECIMALS = 6
_CACHE_LIMIT = 4096  # (model, day) pairs; cleared when full, so it stays bounded


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. `output` is None for models that produce no tokens (embeddings)."""

    input: Decimal
    cached_input: Decimal
    output: Decimal | None
    # The same prices in picodollars per token, exact integers: the request path prices in int arithmetic.
    per_token_pico: tuple[int, int, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if value is None and name == "output":
                continue
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"{name} must be a finite, non-negative Decimal, got {value!r}")
            exponent = value.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -_MAX_PRICE_DECIMALS:
                raise ValueError(f"{name} has more than {_MAX_PRICE_DECIMALS} decimal places: {value}")
        output = None if self.output is None else _pico_per_token(self.output)
        object.__setattr__(
            self, "per_token_pico", (_pico_per_token(self.input), _pico_per_token(self.cached_input), output)
        )

    @classmethod
    def from_entry(cls, entry: PriceEntry) -> Price:
        """An entry without `cached_input` bills cached tokens at `input` (no discount)."""
        cached = entry.input if entry.cached_input is None else entry.cached_input
        return cls(input=entry.input, cached_input=cached, output=entry.output)

    def cost(
        self, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int, reasoning_tokens: int = 0
    ) -> Decimal | None:
        """The USD cost of one request's usage, or None if it has output tokens and this price has no `output`."""
        check_usage(prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens)
        if completion_tokens and self.output is None:
            return None
        total = _EXACT.add(
            _EXACT.multiply(Decimal(prompt_tokens - cached_tokens), self.input),
            _EXACT.multiply(Decimal(cached_tokens), self.cached_input),
        )
        if completion_tokens and self.output is not None:
            total = _EXACT.add(total, _EXACT.multiply(Decimal(completion_tokens), self.output))
        return _EXACT.quantize(_EXACT.scaleb(total, -6), COST_QUANTUM)

    def cost_nano(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int | None:
        """`cost()` in whole nano-USD, rounded half-even like `nano_usd`, for usage already checked."""
        input_pico, cached_pico, output_pico = self.per_token_pico
        if completion_tokens and output_pico is None:
            return None
        pico = (prompt_tokens - cached_tokens) * input_pico + cached_tokens * cached_pico
        if completion_tokens and output_pico is not None:
            pico += completion_tokens * output_pico
        nano, rest = divmod(pico, 1000)
        return nano + 1 if rest > 500 or (rest == 500 and nano % 2) else nano


def _pico_per_token(usd_per_million: Decimal) -> int:
    """USD per 1M tokens (at most 6 decimals) as picodollars per token: exact by construction."""
    return int(_EXACT.scaleb(usd_per_million, 6))


def check_usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int, reasoning_tokens: int) -> None:
    """Refuse usage that cannot be OpenAI's: negative counts, or a part larger than the whole it belongs to."""
    counts = {
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "completion_tokens": completion_tokens,
        "reasoning_tokens": reasoning_tokens,
    }
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if cached_tokens > prompt_tokens:
        raise ValueError(f"cached_tokens ({cached_tokens}) exceed prompt_tokens ({prompt_tokens}), which include them")
    if reasoning_tokens > completion_tokens:
        raise ValueError(
            f"reasoning_tokens ({reasoning_tokens}) exceed completion_tokens ({completion_tokens}), which include them"
        )


def picodollars(cost: Decimal) -> int:
    """`cost` as a whole number of 10^-12 USD, exactly: for stores that keep integer counters."""
    scaled = _EXACT.scaleb(cost, 12)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{cost} USD is not a whole number of picodollars")
    return int(scaled)


class _Schedule:
    """One model's prices over time: `days[i]` is when `prices[i]` takes effect, ascending."""

    __slots__ = ("days", "prices")

    def __init__(self, entries: Sequence[PriceEntry]) -> None:
        dated = sorted(((entry.effective_from or date.min, Price.from_entry(entry)) for entry in entries), key=_day)
        self.days = tuple(day for day, _ in dated)
        self.prices = tuple(price for _, price in dated)

    def at(self, day: date) -> Price | None:
        index = bisect_right(self.days, day)
        return self.prices[index - 1] if index else None


def _day(item: tuple[date, Price]) -> date:
    return item[0]


class PriceBook:
    """Every price the gateway knows, by the model name the caller bills (see `from_config`)."""

    __slots__ = ("_cache", "_schedules")

    def __init__(self, entries: Mapping[str, Sequence[PriceEntry]]) -> None:
        self._schedules = {model: _Schedule(model_entries) for model, model_entries in entries.items()}
        self._cache: dict[tuple[str, date], Price | None] = {}

    @classmethod
    def from_config(cls, config: GatewayConfig, *, base_dir: Path | None = None) -> PriceBook:
        """Read `pricing.file` (relative to `base_dir`, by default the working directory) and resolve every model.

        A configured model is priced by, in order: its own `price:`; the entries for its name; the
        entries for its `upstream_model`. Entries come from `prices:` in the config, and for a name not
        there, from the prices file: a name under `prices:` replaces the file's entries for it whole.
        Any other name is priced by its own entries. Raises ConfigError if the file is missing or invalid.
        """
        table: dict[str, list[PriceEntry]] = {}
        if config.pricing.file is not None:
            table.update(load_prices_file(config.pricing.file, base_dir))
        table.update(config.prices)
        resolved = dict(table)
        for name, model in config.models.items():
            entries = model.price or table.get(name) or table.get(model.upstream_model or name)
            if entries:
                resolved[name] = entries
        return cls(resolved)

    def price_for(self, model: str, day: date) -> Price | None:
        """The price in effect for `model` on the UTC `day`: the latest entry that took effect on or before it."""
        key = (model, day)
        try:
            return self._cache[key]
        except KeyError:
            pass
        schedule = self._schedules.get(model)
        if schedule is None:
            return None  # not cached: unknown names must not grow the cache
        if isinstance(day, datetime) or not isinstance(day, date):
            raise TypeError(f"day must be a datetime.date (a UTC day), got {type(day).__name__}")
        price = schedule.at(day)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = price
        return price

    def is_priced(self, model: str, day: date | None = None) -> bool:
        """Whether `model` has any price at all, or, given `day`, a price in effect on that day."""
        if day is None:
            return model in self._schedules
        return self.price_for(model, day) is not None

    def cost(
        self,
        model: str,
        day: date,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        reasoning_tokens: int = 0,
    ) -> Decimal | None:
        """The exact USD cost of a request `model` answered on `day`; None when it is unpriced, never a made-up 0."""
        price = self.price_for(model, day)
        if price is None:
            check_usage(prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens)
            return None
        return price.cost(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            reasoning_tokens=reasoning_tokens,
        )

    def cost_nano(
        self, model: str, day: date, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int
    ) -> int | None:
        """`nano_usd(cost(...))` in integer arithmetic, for the request path; None when unpriced."""
        price = self.price_for(model, day)
        if price is None:
            return None
        check_usage(prompt_tokens, cached_tokens, completion_tokens, 0)
        return price.cost_nano(prompt_tokens, cached_tokens, completion_tokens)
