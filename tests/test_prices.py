"""The PRICES setting on its own: what it accepts, what it refuses (naming itself), exact nano-unit costs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from usage._config import SettingsError
from usage._prices import Price, format_cost, parse_amount, parse_prices

BASE = {"currency": "USD", "input": 2.5, "cached_input": 1.25, "output": 10}


def _one(**changes: Any) -> str:
    return json.dumps({"gpt-4o": {**BASE, **changes}})


def test_price_history_and_backend_override_pick_the_entry_in_force() -> None:
    """An event takes the entry in force on its UTC date, with its backend's override."""
    prices = parse_prices(json.dumps({"gpt-4o": [
        {**BASE, "effective_from": "2026-11-15", "input": "2.75", "cached_input": "1.375", "output": 11,
         "backends": {"ptu": {"input": 0, "cached_input": 0, "output": 0}}},
        BASE,
    ], "late": {**BASE, "currency": "EUR", "effective_from": "2026-12-01"}}))
    before = datetime(2026, 11, 14, 23, 59, 59, tzinfo=UTC)
    after = datetime(2026, 11, 15, tzinfo=UTC)
    assert prices.lookup("gpt-4o", "east", before) == Price("USD", 2500, 1250, 10000)
    assert prices.lookup("gpt-4o", "ptu", before) == Price("USD", 2500, 1250, 10000)  # override is the later entry's
    assert prices.lookup("gpt-4o", "east", after) == Price("USD", 2750, 1375, 11000)
    assert prices.lookup("gpt-4o", "ptu", after) == Price("USD", 0, 0, 0)
    assert prices.lookup("gpt-4o", None, after) == Price("USD", 2750, 1375, 11000)
    assert prices.lookup("late", "east", after) is None  # not yet in force: unpriced, not 0
    assert prices.lookup("other", "east", after) is None
    assert prices.currency("late") == "EUR" and prices.currency("other") is None


def test_cost_is_exact_in_nano_units() -> None:
    """(prompt − cached) × input + cached × cached_input + completion × output, per million, exactly."""
    price = parse_prices(_one(input="0.15", cached_input="0.075", output="0.6")).lookup(
        "gpt-4o", "x", datetime(2026, 11, 1, tzinfo=UTC))
    assert price is not None
    # 0.15/M × 999,000 + 0.075/M × 1,000 + 0.6/M × 333,333 = 0.14985 + 0.000075 + 0.1999998 = 0.3499248
    assert price.cost_nano(1_000_000, 1_000, 333_333) == 349_924_800
    assert format_cost(price.cost_nano(1_000_000, 1_000, 333_333)) == "0.3499248"
    assert price.cost_nano(0, 0, 0) == 0


@pytest.mark.parametrize(("nano", "text"), [
    (0, "0.00"), (1, "0.000000001"), (12_500_000_000, "12.50"), (123_456_789_012, "123.456789012"),
    (-1_500_000_000, "-1.50"),
])
def test_format_cost(nano: int, text: str) -> None:
    assert format_cost(nano) == text


def test_parse_amount() -> None:
    assert parse_amount("12.5") == 12_500_000_000 and parse_amount("0.000000001") == 1
    for bad in ("-1", "1e3", "1.0000000001", "", "NaN"):
        with pytest.raises(ValueError):
            parse_amount(bad)


@pytest.mark.parametrize("text", [
    "[]", "not json", "5", '{"gpt-4o": []}', '{"gpt-4o": [[]]}', '{"../x": ' + json.dumps(BASE) + "}",
    _one(input=1.0001), _one(input="1.2345"), _one(output=-1), _one(output="-0.5"), _one(input=True),
    _one(input=None), _one(input="1e3"), _one(input=" 1"), _one(input=1e400), _one(output=100_001),
    _one(currency="usd"), _one(currency=None), _one(colour="red"), _one(effective_from="2026-02-30"),
    _one(effective_from="2026-11-15T00:00:00"), _one(effective_from=20261115),
    _one(backends=[]), _one(backends={"ptu": {"input": 0}}), _one(backends={"ptu": {**BASE}}),
    _one(backends={"ptu": {"input": 0, "cached_input": 0, "output": 0.0001}}),
    json.dumps({"gpt-4o": [BASE, BASE]}),
    json.dumps({"gpt-4o": [BASE, {**BASE, "currency": "EUR", "effective_from": "2026-11-15"}]}),
    '{"gpt-4o": {"currency": "USD", "input": NaN, "cached_input": 1, "output": 1}}',
    '{"gpt-4o": {"currency": "USD", "input": Infinity, "cached_input": 1, "output": 1}}',
    '{"gpt-4o": {"currency": "USD", "input": 1, "input": 2, "cached_input": 1, "output": 1}}',
    "[" * 100_000,
])
def test_bad_prices_are_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_prices(text)
    assert caught.value.name == "PRICES" and "PRICES" in str(caught.value)


def test_prices_may_be_numbers_or_decimal_strings_up_to_three_places() -> None:
    prices = parse_prices(_one(input="0.001", cached_input=0.0, output="100000"))
    assert prices.lookup("gpt-4o", "x", datetime(2026, 1, 1, tzinfo=UTC)) == Price("USD", 1, 0, 100_000_000)
    assert not parse_prices("") and not parse_prices("{}")


def test_prices_written_back_read_the_same() -> None:
    """dump_prices (what the test harness writes as the app setting) reads back into equal prices."""
    from usage._prices import dump_prices

    text = json.dumps({"gpt-4o": [BASE, {**BASE, "input": "0.001", "effective_from": "2026-11-15",
                                         "backends": {"ptu": {"input": 0, "cached_input": 0, "output": "99999.999"}}}],
                       "mini": {**BASE, "currency": "EUR", "output": "0.6"}})
    prices = parse_prices(text)
    assert parse_prices(dump_prices(prices)) == prices and prices != parse_prices(_one())
