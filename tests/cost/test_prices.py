"""Prices and costs: arithmetic, effective dates, where a price comes from, exactness, config errors."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config
from gateway.config.loader import check_pricing, load_prices_file
from gateway.cost import Price, PriceBook, picodollars
from gateway.cost.ledger import nano_usd
from gateway.cost.prices import check_usage

REPO = Path(__file__).resolve().parents[2]

FILE = """
models:
  gpt-4o:
    - {effective_from: 2024-05-13, input: 5.00, output: 15.00}
    - {effective_from: 2024-10-02, input: 2.50, cached_input: 1.25, output: 10.00}
  gpt-4o-mini: {effective_from: 2024-07-18, input: 0.15, cached_input: 0.075, output: 0.60}
  gpt-5-nano: [{input: 0.05, cached_input: 0.005, output: 0.40}]
  text-embedding-3-small: [{effective_from: 2024-01-25, input: 0.02}]
"""

DAY = date(2025, 1, 1)


def _config(tmp_path: Path, file_text: str | None = FILE, **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1"}},
        "models": {"gpt-4o": {"upstream": "openai"}},
        "pricing": {"file": "prices.yaml"},
        **sections,
    }
    if file_text is not None:
        (tmp_path / "prices.yaml").write_text(file_text)
    return parse_config(data, "test.yaml", env={})


def _book(tmp_path: Path, file_text: str | None = FILE, **sections: Any) -> PriceBook:
    return PriceBook.from_config(_config(tmp_path, file_text, **sections), base_dir=tmp_path)


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.yaml", env={})
    return caught.value.problems


# --- arithmetic -----------------------------------------------------------------------------------


def test_cached_tokens_are_the_part_of_prompt_tokens_billed_at_cached_input(tmp_path: Path) -> None:
    book = _book(tmp_path)
    # gpt-4o from 2024-10-02: (600 x 2.50 + 400 x 1.25 + 500 x 10.00) / 1M = 7000 / 1M
    cost = book.cost("gpt-4o", DAY, prompt_tokens=1000, cached_tokens=400, completion_tokens=500)
    assert cost == Decimal("0.007")
    assert str(cost) == "0.007000000000"  # always quantized to picodollars


def test_reasoning_tokens_are_inside_completion_tokens_and_cost_nothing_extra(tmp_path: Path) -> None:
    book = _book(tmp_path)
    # gpt-5-nano: (234 x 0.05 + 1000 x 0.005 + 77 x 0.40) / 1M = (11.7 + 5 + 30.8) / 1M
    usage = {"prompt_tokens": 1234, "cached_tokens": 1000, "completion_tokens": 77}
    with_reasoning = book.cost("gpt-5-nano", DAY, **usage, reasoning_tokens=50)
    assert with_reasoning == Decimal("0.0000475")
    assert book.cost("gpt-5-nano", DAY, **usage) == with_reasoning


def test_without_cached_input_cached_tokens_cost_the_input_price(tmp_path: Path) -> None:
    book = _book(tmp_path)
    # gpt-4o before 2024-10-02: 5.00 / 15.00, no cached price: 1000 x 5.00 + 10 x 15.00
    cost = book.cost("gpt-4o", date(2024, 6, 1), prompt_tokens=1000, cached_tokens=500, completion_tokens=10)
    assert cost == Decimal("0.00515")


def test_embeddings_bill_input_tokens_only(tmp_path: Path) -> None:
    book = _book(tmp_path)
    assert book.cost("text-embedding-3-small", DAY, prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=0) == (
        Decimal("0.02")
    )
    assert book.cost("text-embedding-3-small", DAY, prompt_tokens=8191, cached_tokens=0, completion_tokens=0) == (
        Decimal("0.00016382")
    )
    price = book.price_for("text-embedding-3-small", DAY)
    assert price == Price(input=Decimal("0.02"), cached_input=Decimal("0.02"), output=None)


def test_output_tokens_on_a_price_without_output_are_unpriced_not_free(tmp_path: Path) -> None:
    book = _book(tmp_path)
    assert book.cost("text-embedding-3-small", DAY, prompt_tokens=10, cached_tokens=0, completion_tokens=1) is None


def test_zero_usage_of_a_priced_model_costs_zero(tmp_path: Path) -> None:
    book = _book(tmp_path)
    assert book.cost("gpt-4o", DAY, prompt_tokens=0, cached_tokens=0, completion_tokens=0) == 0


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"prompt_tokens": -1}, "prompt_tokens must be a non-negative int"),
        ({"completion_tokens": 1.5}, "completion_tokens must be a non-negative int"),
        ({"cached_tokens": True}, "cached_tokens must be a non-negative int"),
        ({"prompt_tokens": 10, "cached_tokens": 11}, r"cached_tokens \(11\) exceed prompt_tokens \(10\)"),
        ({"completion_tokens": 5, "reasoning_tokens": 6}, r"reasoning_tokens \(6\) exceed completion_tokens \(5\)"),
    ],
)
def test_impossible_usage_is_refused_priced_or_not(tmp_path: Path, usage: dict[str, Any], message: str) -> None:
    book = _book(tmp_path)
    full = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0, **usage}
    for model in ("gpt-4o", "no-such-model"):
        with pytest.raises(ValueError, match=message):
            book.cost(model, DAY, **full)


# --- effective dates ------------------------------------------------------------------------------


def test_before_the_first_entry_a_model_is_unpriced(tmp_path: Path) -> None:
    book = _book(tmp_path)
    early = date(2024, 5, 12)
    assert book.price_for("gpt-4o", early) is None
    assert book.cost("gpt-4o", early, prompt_tokens=10, cached_tokens=0, completion_tokens=0) is None
    assert book.is_priced("gpt-4o")  # it has prices, just none on that day
    assert not book.is_priced("gpt-4o", early)
    assert book.is_priced("gpt-4o", date(2024, 5, 13))


def test_a_new_entry_takes_effect_on_its_day(tmp_path: Path) -> None:
    book = _book(tmp_path)
    old = book.price_for("gpt-4o", date(2024, 10, 1))
    new = book.price_for("gpt-4o", date(2024, 10, 2))
    assert old is not None
    assert new is not None
    assert (old.input, old.cached_input, old.output) == (Decimal("5.00"), Decimal("5.00"), Decimal("15.00"))
    assert (new.input, new.cached_input, new.output) == (Decimal("2.50"), Decimal("1.25"), Decimal("10.00"))
    assert book.price_for("gpt-4o", date(2099, 1, 1)) == new


def test_entries_may_be_listed_in_any_order(tmp_path: Path) -> None:
    shuffled = """
models:
  m:
    - {effective_from: 2025-03-01, input: 3}
    - {input: 1}
    - {effective_from: 2025-02-01, input: 2}
"""
    book = _book(tmp_path, shuffled)
    prices = [book.price_for("m", date(2025, month, 1)) for month in (1, 2, 3)]
    assert [price.input if price else None for price in prices] == [1, 2, 3]


def test_an_entry_without_effective_from_applies_since_always(tmp_path: Path) -> None:
    book = _book(tmp_path)
    assert book.price_for("gpt-5-nano", date(1970, 1, 1)) is not None


def test_day_must_be_a_date_not_a_datetime(tmp_path: Path) -> None:
    book = _book(tmp_path)
    with pytest.raises(TypeError, match=r"datetime\.date"):
        book.price_for("gpt-4o", datetime(2025, 1, 1, tzinfo=UTC))


# --- where a price comes from ---------------------------------------------------------------------


def test_prices_in_the_config_replace_the_files_entries_for_that_model(tmp_path: Path) -> None:
    book = _book(tmp_path, prices={"gpt-4o": {"effective_from": "2024-12-01", "input": 1, "output": 2}})
    price = book.price_for("gpt-4o", DAY)
    assert price == Price(input=Decimal(1), cached_input=Decimal(1), output=Decimal(2))
    # The file's older entries for gpt-4o are gone with it, not merged.
    assert book.price_for("gpt-4o", date(2024, 11, 30)) is None
    # Other models keep the file's prices, and the config may add new names.
    assert book.is_priced("gpt-4o-mini")


def test_a_models_own_price_beats_the_config_and_the_file(tmp_path: Path) -> None:
    book = _book(
        tmp_path,
        models={"gpt-4o": {"upstream": "openai", "price": [{"input": 7, "output": 8}]}},
        prices={"gpt-4o": {"input": 1, "output": 2}},
    )
    assert book.price_for("gpt-4o", DAY) == Price(input=Decimal(7), cached_input=Decimal(7), output=Decimal(8))


def test_a_model_without_a_price_of_its_own_is_priced_by_its_upstream_model(tmp_path: Path) -> None:
    book = _book(
        tmp_path,
        models={
            "fast": {"upstream": "openai", "upstream_model": "gpt-4o-mini"},
            "azure-gpt": {"upstream": "openai", "upstream_model": "my-deployment"},
        },
        prices={"my-deployment": {"input": "0.5", "output": "1.5"}},
    )
    assert book.price_for("fast", DAY) == book.price_for("gpt-4o-mini", DAY)
    assert book.cost("fast", DAY, prompt_tokens=1000, cached_tokens=0, completion_tokens=0) == Decimal("0.00015")
    assert book.price_for("azure-gpt", DAY) == Price(Decimal("0.5"), Decimal("0.5"), Decimal("1.5"))


def test_the_models_own_name_beats_its_upstream_model(tmp_path: Path) -> None:
    book = _book(tmp_path, models={"gpt-4o": {"upstream": "openai", "upstream_model": "gpt-4o-mini"}})
    price = book.price_for("gpt-4o", DAY)
    assert price is not None
    assert price.input == Decimal("2.50")


def test_a_fallback_lends_no_price_the_answering_model_is_billed(tmp_path: Path) -> None:
    book = _book(
        tmp_path,
        models={"custom": {"upstream": "openai", "fallbacks": ["gpt-4o-mini"]}, "gpt-4o-mini": {"upstream": "openai"}},
    )
    assert not book.is_priced("custom")
    usage = {"prompt_tokens": 100, "cached_tokens": 0, "completion_tokens": 100}
    assert book.cost("custom", DAY, **usage) is None
    assert book.cost("gpt-4o-mini", DAY, **usage) == Decimal("0.000075")


def test_an_unpriced_model_is_never_zero(tmp_path: Path) -> None:
    book = _book(tmp_path, models={"mystery": {"upstream": "openai"}})
    assert not book.is_priced("mystery")
    assert not book.is_priced("mystery", DAY)
    assert book.price_for("mystery", DAY) is None
    assert book.cost("mystery", DAY, prompt_tokens=0, cached_tokens=0, completion_tokens=0) is None
    assert book.cost("mystery", DAY, prompt_tokens=100, cached_tokens=0, completion_tokens=100) is None


def test_without_a_file_only_the_config_prices(tmp_path: Path) -> None:
    book = _book(tmp_path, None, pricing={"file": None}, prices={"gpt-4o": {"input": 1, "output": 1}})
    assert book.is_priced("gpt-4o")
    assert not book.is_priced("gpt-4o-mini")


def test_lookups_are_cached_per_model_and_day_and_unknown_names_are_not(tmp_path: Path) -> None:
    book = _book(tmp_path)
    first = book.price_for("gpt-4o", DAY)
    assert book.price_for("gpt-4o", DAY) is first
    assert ("gpt-4o", DAY) in book._cache
    book.price_for("no-such-model", DAY)
    assert ("no-such-model", DAY) not in book._cache


# --- exactness ------------------------------------------------------------------------------------

_PRICES = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
_TOKENS = st.integers(min_value=0, max_value=10**9)


@st.composite
def _usage(draw: st.DrawFn) -> dict[str, int]:
    prompt, completion = draw(_TOKENS), draw(_TOKENS)
    return {
        "prompt_tokens": prompt,
        "cached_tokens": draw(st.integers(min_value=0, max_value=prompt)),
        "completion_tokens": completion,
        "reasoning_tokens": draw(st.integers(min_value=0, max_value=completion)),
    }


@given(input_=_PRICES, cached=_PRICES, output=_PRICES, a=_usage(), b=_usage())
def test_costs_are_exact_and_additive(input_: Decimal, cached: Decimal, output: Decimal, a: Any, b: Any) -> None:
    price = Price(input=input_, cached_input=cached, output=output)
    both = {key: a[key] + b[key] for key in a}
    cost_a, cost_b, cost_both = price.cost(**a), price.cost(**b), price.cost(**both)
    assert cost_a is not None
    assert cost_b is not None
    assert cost_both is not None
    assert cost_a + cost_b == cost_both
    assert picodollars(cost_a) + picodollars(cost_b) == picodollars(cost_both)
    uncached = both["prompt_tokens"] - both["cached_tokens"]
    exact = (
        Fraction(uncached) * Fraction(input_)
        + Fraction(both["cached_tokens"]) * Fraction(cached)
        + Fraction(both["completion_tokens"]) * Fraction(output)
    ) / 1_000_000
    assert Fraction(cost_both) == exact


def test_a_thousand_small_costs_add_up_exactly(tmp_path: Path) -> None:
    book = _book(tmp_path)
    one = book.cost("gpt-5-nano", DAY, prompt_tokens=1, cached_tokens=1, completion_tokens=0)
    assert one == Decimal("0.000000005")
    assert sum([one] * 1000, Decimal(0)) == Decimal("0.000005")  # 0.1 + 0.2 style drift cannot happen


def test_picodollars() -> None:
    assert picodollars(Decimal("0.007")) == 7_000_000_000
    assert picodollars(Decimal(0)) == 0
    with pytest.raises(ValueError, match="not a whole number of picodollars"):
        picodollars(Decimal("1E-13"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input": Decimal(-1)}, "input must be a finite, non-negative Decimal"),
        ({"cached_input": 0.5}, "cached_input must be a finite, non-negative Decimal"),
        ({"output": Decimal("NaN")}, "output must be a finite, non-negative Decimal"),
        ({"input": Decimal("0.0000001")}, "more than 6 decimal places"),
    ],
)
def test_a_price_built_in_code_is_checked_too(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Price(**{"input": Decimal(1), "cached_input": Decimal(1), "output": Decimal(1), **fields})


def test_check_usage_accepts_openai_shaped_usage() -> None:
    check_usage(100, 100, 50, 50)


# --- config validation ----------------------------------------------------------------------------

_UPSTREAMS = {"upstreams": {"openai": {"base_url": "https://api.openai.com/v1"}}}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"prices": {"gpt-4o": [{"input": -1, "output": 1}]}},
            "test.yaml:prices.gpt-4o[0].input: Input should be greater than or equal to 0",
        ),
        (
            {"prices": {"gpt-4o": {"input": 1, "output": -0.5}}},
            "test.yaml:prices.gpt-4o[0].output: Input should be greater than or equal to 0",
        ),
        (
            {"prices": {"gpt-4o": [{"input": 1, "effective_from": "2024-13-01"}]}},
            "test.yaml:prices.gpt-4o[0].effective_from: expected a date as YYYY-MM-DD, got '2024-13-01' "
            "(month must be in 1..12)",
        ),
        (
            {"prices": {"gpt-4o": [{"input": 1, "effective_from": "1 May 2024"}]}},
            "test.yaml:prices.gpt-4o[0].effective_from: expected a date as YYYY-MM-DD, got '1 May 2024'",
        ),
        (
            {"prices": {"gpt-4o": [{"input": 1, "effective_from": 20240501}]}},
            "test.yaml:prices.gpt-4o[0].effective_from: expected a date as YYYY-MM-DD, got 20240501",
        ),
        (
            {
                "prices": {
                    "gpt-4o": [
                        {"input": 1, "effective_from": "2024-05-01"},
                        {"input": 2, "effective_from": "2024-05-01"},
                    ]
                }
            },
            "test.yaml:prices.gpt-4o: entries [0] and [1] both take effect on 2024-05-01",
        ),
        (
            {"prices": {"gpt-4o": [{"input": 1}, {"input": 2}]}},
            "test.yaml:prices.gpt-4o: entries [0] and [1] both take effect without effective_from",
        ),
        ({"prices": {"gpt-4o": []}}, "test.yaml:prices.gpt-4o: give at least one price entry"),
        (
            {"prices": {"gpt-4o": 2.5}},
            "test.yaml:prices.gpt-4o: expected a price entry {input: ..., cached_input: ..., output: ...} or a list",
        ),
        (
            {"prices": {"gpt-4o": {"input": "0.0000001"}}},
            "test.yaml:prices.gpt-4o[0].input: Decimal input should have no more than 6 decimal places",
        ),
        (
            {"prices": {"gpt-4o": {"input": float("inf")}}},
            "test.yaml:prices.gpt-4o[0].input: Input should be a finite number",
        ),
        ({"prices": {"gpt-4o": {"input": "NaN"}}}, "test.yaml:prices.gpt-4o[0].input: Input should be a finite number"),
        ({"prices": {"gpt-4o": {"input": True}}}, "test.yaml:prices.gpt-4o[0].input: Decimal input should be"),
        ({"prices": {"gpt-4o": {"output": 1}}}, "test.yaml:prices.gpt-4o[0].input: Field required"),
        (
            {"prices": {"gpt-4o": {"input": 1, "ouput": 1}}},
            "test.yaml:prices.gpt-4o[0].ouput: unknown key (check its spelling; see docs/config.md)",
        ),
        (
            {"models": {"m": {"upstream": "openai", "price": {"input": 1, "cached_input": -1}}}},
            "test.yaml:models.m.price[0].cached_input: Input should be greater than or equal to 0",
        ),
        (
            {"models": {"m": {"upstream": "openai", "price": [{"input": 1}, {"input": "x"}]}}},
            "test.yaml:models.m.price[1].input: Input should be a valid decimal",
        ),
        ({"pricing": {"unpriced": "deny"}}, "test.yaml:pricing.unpriced: Input should be 'record' or 'reject'"),
        ({"pricing": {"file": ""}}, "test.yaml:pricing.file: String should have at least 1 character"),
        ({"pricing": {"fiel": "x.yaml"}}, "test.yaml:pricing.fiel: unknown key"),
    ],
)
def test_config_errors_name_the_key_path(section: dict[str, Any], expected: str) -> None:
    problems = _problems({**_UPSTREAMS, **section})
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_prices_parse_from_numbers_strings_and_dates() -> None:
    config = parse_config(
        {
            "prices": {
                "a": {"input": 2.5, "output": "10.00", "effective_from": date(2024, 8, 6)},
                "b": [{"input": "0.075", "effective_from": "2024-08-06"}],
            }
        },
        "test.yaml",
        env={},
    )
    a, b = config.prices["a"][0], config.prices["b"][0]
    assert (a.input, a.output, a.cached_input, a.effective_from) == (
        Decimal("2.5"),
        Decimal(10),
        None,
        date(2024, 8, 6),
    )
    assert (b.input, b.output, b.effective_from) == (Decimal("0.075"), None, date(2024, 8, 6))
    assert config.pricing.unpriced == "record"
    assert config.pricing.file == "config/prices.yaml"


def test_a_bad_date_in_a_config_file_is_a_key_path_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("prices:\n  gpt-4o:\n    - {effective_from: 2024-02-30, input: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        f"{path}:prices.gpt-4o[0].effective_from: expected a date as YYYY-MM-DD, got '2024-02-30' "
        "(day is out of range for month)"
    ]


def test_an_unquoted_date_elsewhere_in_a_config_file_stays_text(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("upstreams:\n  az: {kind: azure, base_url: 'https://x.test', api_version: 2024-10-21}\n")
    assert load_config(path, env={}).upstreams["az"].api_version == "2024-10-21"


# --- the prices file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  gpt-4o: [{input: -2}]\n", "prices.yaml:models.gpt-4o[0].input: Input should be greater than"),
        (
            "models:\n  gpt-4o: [{input: 1, effective_from: 2024-02-30}]\n",
            "prices.yaml:models.gpt-4o[0].effective_from",
        ),
        ("model:\n  gpt-4o: [{input: 1}]\n", "prices.yaml:model: unknown key"),
        ("- gpt-4o\n", "prices.yaml: expected a mapping with a `models:` key, got list"),
        ("models: [unclosed\n", "prices.yaml:2:1: invalid YAML"),
    ],
)
def test_an_invalid_prices_file_fails_with_file_and_key_path(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _book(tmp_path, text)
    assert caught.value.problems[0].startswith(expected), caught.value.problems


def test_a_missing_prices_file_fails_and_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _book(tmp_path, None)
    (problem,) = caught.value.problems
    assert problem.startswith("prices.yaml: cannot read the prices file (pricing.file, read as ")
    assert str(tmp_path / "prices.yaml") in problem
    assert problem.endswith("No such file or directory")


def test_an_absolute_prices_path_ignores_base_dir(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.yaml").write_text(FILE)
    config = _config(tmp_path, None, pricing={"file": str(tmp_path / "elsewhere.yaml")})
    assert PriceBook.from_config(config, base_dir=REPO / "no-such-dir").is_priced("gpt-4o")


def test_an_empty_prices_file_prices_nothing(tmp_path: Path) -> None:
    book = _book(tmp_path, "")
    assert not book.is_priced("gpt-4o")


# --- pricing.unpriced: reject fails at start-up ---------------------------------------------------


def _write_config(tmp_path: Path, pricing: dict[str, Any], models: dict[str, Any]) -> Path:
    (tmp_path / "prices.yaml").write_text(FILE)
    data = {**_UPSTREAMS, "models": models, "pricing": pricing}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reject_with_an_unpriced_model_stops_start_up_naming_it(tmp_path: Path) -> None:
    models = {
        "gpt-4o": {"upstream": "openai"},
        "fast": {"upstream": "openai", "upstream_model": "gpt-4o-mini"},
        "mystery": {"upstream": "openai", "fallbacks": ["gpt-4o"]},
    }
    path = _write_config(tmp_path, {"unpriced": "reject", "file": str(tmp_path / "prices.yaml")}, models)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        f"{path}:models.mystery: no price for model 'mystery', and pricing.unpriced is 'reject': give it a "
        f"price:, add it (or its upstream_model) under prices:, or to the prices file {tmp_path / 'prices.yaml'}"
    ]


def test_reject_with_every_model_priced_starts(tmp_path: Path) -> None:
    models = {
        "gpt-4o": {"upstream": "openai"},
        "fast": {"upstream": "openai", "upstream_model": "gpt-4o-mini"},
        "own": {"upstream": "openai", "price": {"input": 1}},
    }
    path = _write_config(tmp_path, {"unpriced": "reject", "file": str(tmp_path / "prices.yaml")}, models)
    config = load_config(path, env={})
    book = PriceBook.from_config(config)
    assert all(book.is_priced(name) for name in config.models)


def test_reject_reads_a_relative_prices_file_from_base_dir(tmp_path: Path) -> None:
    config = _config(tmp_path, FILE, pricing={"unpriced": "reject", "file": "prices.yaml"})
    check_pricing(config, "test.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"prices\.yaml: cannot read the prices file"):
        check_pricing(config, "test.yaml", base_dir=tmp_path / "missing")


def test_reject_counts_prices_in_the_config(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        None,
        models={"custom": {"upstream": "openai"}},
        prices={"custom": {"input": 1}},
        pricing={"unpriced": "reject", "file": None},
    )
    check_pricing(config, "test.yaml")


def test_record_leaves_the_prices_file_to_the_price_book(tmp_path: Path) -> None:
    # With `record`, load_config does not read the prices file: building the PriceBook at start-up does,
    # and fails there if it is missing or invalid.
    path = _write_config(tmp_path, {"file": str(tmp_path / "missing.yaml")}, {"mystery": {"upstream": "openai"}})
    config = load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read the prices file"):
        PriceBook.from_config(config)


# --- the shipped prices ---------------------------------------------------------------------------

CONTRACT_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
]


def test_the_shipped_prices_file_loads_and_lists_the_current_openai_models() -> None:
    models = load_prices_file("config/prices.yaml", base_dir=REPO)
    assert set(CONTRACT_MODELS) <= set(models)
    for name, entries in models.items():
        assert all(entry.effective_from is not None for entry in entries), name
        embedding = name.startswith("text-embedding-")
        assert all((entry.output is None) == embedding for entry in entries), name


def _shipped_configs() -> list[tuple[str, GatewayConfig]]:
    env = {"GATEWAY_API_KEY": "sk-gw-test"}
    configs = [(name, load_config(REPO / "config" / name, env=env)) for name in ("gateway.yaml", "demo.yaml")]
    helm = yaml.safe_load((REPO / "helm" / "gateway" / "values.yaml").read_text())
    chart = yaml.safe_load(helm["config"])
    # The chart reads the image's copy, /etc/gateway/prices.yaml: here, the repository's.
    assert chart["pricing"]["file"] == "/etc/gateway/prices.yaml"
    chart["pricing"]["file"] = "config/prices.yaml"
    configs.append(("helm values.yaml", parse_config(chart, "values.yaml", env=env)))
    return configs


def test_the_shipped_prices_cover_every_model_of_the_shipped_configs() -> None:
    today = datetime.now(UTC).date()
    for name, config in _shipped_configs():
        book = PriceBook.from_config(config, base_dir=REPO)
        unpriced = [model for model in config.models if not book.is_priced(model, today)]
        assert unpriced == [], f"{name}: no price today for {unpriced}"


def test_the_shipped_configs_start_under_reject() -> None:
    for _, config in _shipped_configs():
        strict = config.model_copy(update={"pricing": config.pricing.model_copy(update={"unpriced": "reject"})})
        check_pricing(strict, "test.yaml", base_dir=REPO)


def test_shipped_prices_sample(tmp_path: Path) -> None:
    book = PriceBook.from_config(GatewayConfig(), base_dir=REPO)
    # o3 before and after its 2025-06-10 cut: 1M prompt (half cached) + 1M completion.
    usage = {"prompt_tokens": 1_000_000, "cached_tokens": 500_000, "completion_tokens": 1_000_000}
    assert book.cost("o3", date(2025, 6, 9), **usage) == Decimal("5") + Decimal("1.25") + Decimal("40")
    assert book.cost("o3", date(2025, 6, 10), **usage) == Decimal("1") + Decimal("0.25") + Decimal("8")
    assert book.cost("o3", date(2025, 4, 15), **usage) is None


@given(input_=_PRICES, cached=_PRICES, output=_PRICES | st.none(), usage=_usage())
def test_integer_nano_cost_equals_the_decimal_cost_rounded(
    input_: Decimal, cached: Decimal, output: Decimal | None, usage: Any
) -> None:
    price = Price(input=input_, cached_input=cached, output=output)
    parts = (usage["prompt_tokens"], usage["cached_tokens"], usage["completion_tokens"])
    assert price.cost_nano(*parts) == nano_usd(price.cost(**usage))


def test_nano_cost_rounds_half_to_even() -> None:
    price = Price(input=Decimal("0.0005"), cached_input=Decimal(0), output=Decimal("0.0015"))  # 500, 1500 pico a token
    assert price.cost_nano(1, 0, 0) == 0  # 0.5 nano -> 0
    assert price.cost_nano(0, 0, 1) == 2  # 1.5 nano -> 2
    assert price.cost_nano(3, 0, 0) == 2  # 1.5 nano -> 2
    assert price.cost_nano(5, 0, 0) == 2  # 2.5 nano -> 2
