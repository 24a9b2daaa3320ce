"""The ``PRICES`` setting: each deployment's price history, and exact costs in nano-units.

``PRICES`` is JSON, ``{"<deployment>": ENTRY or [ENTRY, ...]}``, prices per million tokens::

    {"gpt-4o": [{"currency": "USD", "input": 2.5, "cached_input": 1.25, "output": 10},
                {"currency": "USD", "input": "2.75", "cached_input": "1.375", "output": 11,
                 "effective_from": "2026-11-15",
                 "backends": {"ptu-swedencentral": {"input": 0, "cached_input": 0, "output": 0}}}]}

A price is a JSON number or a decimal string, from 0 to ``MAX_PRICE``, with at most 3 decimal places.
So a price ``p`` per million tokens is exactly ``p × 1000`` nano-units (10⁻⁹ of the currency) per token:
an integer, and every cost below is integer arithmetic, exact to the nano-unit.

An entry without ``effective_from`` is in force from the beginning; one with it from that UTC date on,
until the next entry's. A deployment's entries share one currency (a change of currency is a new
deployment name, or a new setting once the old month is billed), so a counter row never mixes two.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from usage._config import SettingsError

PRICES_SETTING = "PRICES"
NANO = 10**9  # nano-units per currency unit
#: the largest price per million tokens (1e8 nano-units per token): a key's month of cost fits Int64
#: at this rate up to 92 billion tokens, and one event's cost is checked against Int64 when counted
MAX_PRICE = Decimal(100_000)
_DEPLOYMENT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RATES = ("input", "cached_input", "output")
_ENTRY_FIELDS = frozenset({"currency", *_RATES, "effective_from", "backends"})
_AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


class PricesError(SettingsError):
    """``PRICES`` is malformed; the message names the setting and where in it."""

    def __init__(self, problem: str) -> None:
        super().__init__(PRICES_SETTING, problem)


@dataclass(frozen=True, slots=True)
class Rates:
    """Nano-units per token."""

    input: int
    cached_input: int
    output: int


@dataclass(frozen=True, slots=True)
class Price:
    """The price in force for one event: its currency and nano-units per token."""

    currency: str
    input: int
    cached_input: int
    output: int

    def cost_nano(self, prompt: int, cached: int, completion: int) -> int:
        """(prompt − cached) × input + cached × cached_input + completion × output, in nano-units.

        Reasoning tokens are inside ``completion``. Cached tokens beyond the prompt (which AOAI never
        reports) are counted as the prompt's, so a cost is never negative.
        """
        cached = min(cached, prompt)
        return (prompt - cached) * self.input + cached * self.cached_input + completion * self.output


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One entry of a deployment's price history."""

    currency: str
    rates: Rates
    effective_from: date | None = None
    backends: Mapping[str, Rates] = MappingProxyType({})

    def price(self, backend: str | None = None) -> Price:
        rates = self.backends.get(backend, self.rates) if backend is not None else self.rates
        return Price(self.currency, rates.input, rates.cached_input, rates.output)


@dataclass(frozen=True, slots=True)
class Prices:
    """Every deployment's price history, oldest entry first."""

    entries: Mapping[str, tuple[PriceEntry, ...]] = MappingProxyType({})

    def __bool__(self) -> bool:
        return bool(self.entries)

    def lookup(self, deployment: str, backend: str | None, when: datetime) -> Price | None:
        """The price in force for ``deployment`` at ``when`` (its UTC date), with ``backend``'s override;
        ``None`` when none is (the usage is then counted as unpriced). ``backend=None``: the base rates."""
        history = self.entries.get(deployment)
        if not history:
            return None
        day = (when.astimezone(UTC) if when.tzinfo is not None else when).date()
        starts = [date.min if e.effective_from is None else e.effective_from for e in history]
        index = bisect_right(starts, day) - 1
        return None if index < 0 else history[index].price(backend)

    def currency(self, deployment: str) -> str | None:
        """The deployment's currency (all its entries share it), ``None`` when it has no price."""
        history = self.entries.get(deployment)
        return history[0].currency if history else None


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise PricesError(f"{name!r} is given twice in one object")
        document[name] = value
    return document


def _refuse_constant(name: str) -> Any:
    raise PricesError(f"{name} is not a price")


def _nano_per_token(value: Any, where: str) -> int:
    """A price per million tokens as nano-units per token, exactly."""
    if isinstance(value, str):
        if not _DECIMAL_TEXT.fullmatch(value):
            raise PricesError(f"{where} must be a decimal number like \"2.5\", not {value[:40]!r}")
        number = Decimal(value)
    elif isinstance(value, Decimal):  # a JSON number, as parsed below
        number = value
    else:  # bool, null, list, object
        raise PricesError(f"{where} must be a number or a decimal string, not {json.dumps(value)[:40]}")
    if not number.is_finite():
        raise PricesError(f"{where} must be a finite number")
    if number < 0:
        raise PricesError(f"{where} must not be negative, not {value}")
    if number > MAX_PRICE:
        raise PricesError(f"{where} must be at most {MAX_PRICE} per million tokens, not {str(value)[:40]}")
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    significant = list(digits)
    while exponent < -3 and significant and significant[-1] == 0:
        significant.pop()
        exponent += 1
    if exponent < -3 and any(significant):
        raise PricesError(f"{where} has more than 3 decimal places ({str(value)[:40]}): a price per million "
                          "tokens must be a whole number of nano-units per token")
    whole = int("".join(map(str, significant)) or "0")
    return whole * 10 ** (exponent + 3) if exponent >= -3 else 0


def _rates(item: Any, where: str, *, extra: frozenset[str] = frozenset()) -> Rates:
    if not isinstance(item, dict):
        raise PricesError(f"{where} must be an object")
    unknown = set(item) - set(_RATES) - extra
    if unknown:
        raise PricesError(f"{where} has unknown field(s) {sorted(unknown)}")
    missing = [name for name in _RATES if name not in item]
    if missing:
        raise PricesError(f"{where} lacks {', '.join(missing)} (prices per million tokens)")
    return Rates(*(_nano_per_token(item[name], f"{where}.{name}") for name in _RATES))


def _entry(item: Any, where: str) -> PriceEntry:
    if not isinstance(item, dict):
        raise PricesError(f"{where} must be an object (or a list of them)")
    unknown = set(item) - _ENTRY_FIELDS
    if unknown:
        raise PricesError(f"{where} has unknown field(s) {sorted(unknown)}")
    currency = item.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise PricesError(f"{where}.currency must be a three-letter code like \"USD\"")
    rates = _rates(item, where, extra=_ENTRY_FIELDS - set(_RATES))
    effective: date | None = None
    if "effective_from" in item:
        raw = item["effective_from"]
        if not isinstance(raw, str) or not _DATE.fullmatch(raw):
            raise PricesError(f"{where}.effective_from must be a date YYYY-MM-DD (UTC)")
        try:
            effective = date.fromisoformat(raw)
        except ValueError:
            raise PricesError(f"{where}.effective_from {raw!r} is not a date") from None
    overrides: dict[str, Rates] = {}
    backends = item.get("backends", {})
    if not isinstance(backends, dict):
        raise PricesError(f"{where}.backends must be an object of backend name to prices")
    for name, override in backends.items():
        if not name.strip():
            raise PricesError(f"{where}.backends has an empty backend name")
        overrides[name] = _rates(override, f"{where}.backends.{name}")
    return PriceEntry(currency, rates, effective, MappingProxyType(overrides))


def _history(deployment: str, raw: Any) -> tuple[PriceEntry, ...]:
    where = f"[{deployment!r}]"
    if not _DEPLOYMENT.fullmatch(deployment) or deployment in (".", ".."):
        raise PricesError(f"{where} is not a plain deployment name")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise PricesError(f"{where} is an empty list")
    entries = [_entry(item, f"{where}[{i}]" if isinstance(raw, list) else where) for i, item in enumerate(items)]
    if len({e.currency for e in entries}) > 1:
        raise PricesError(f"{where} mixes currencies {sorted({e.currency for e in entries})}: a deployment's "
                          "entries must share one currency")
    starts = [e.effective_from for e in entries]
    if len(set(starts)) != len(starts):
        raise PricesError(f"{where} has two entries with the same effective_from "
                          "(at most one may leave it out)")
    return tuple(sorted(entries, key=lambda e: date.min if e.effective_from is None else e.effective_from))


def parse_prices(text: str) -> Prices:
    """Parse ``PRICES``; empty means no prices (all usage is counted as unpriced).

    Raises ``PricesError`` (a ``SettingsError``) naming the setting and what is wrong.
    """
    if not text.strip():
        return Prices()
    try:
        document = json.loads(text, object_pairs_hook=_strict_object, parse_float=Decimal, parse_int=Decimal,
                              parse_constant=_refuse_constant)
    except PricesError:
        raise
    except RecursionError:
        raise PricesError("is nested too deep") from None
    except (ValueError, InvalidOperation) as exc:
        raise PricesError(f"is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise PricesError('must be a JSON object {"<deployment>": {"currency", "input", "cached_input", '
                          '"output"} or a list of them}')
    return Prices(MappingProxyType({name: _history(name, raw) for name, raw in document.items()}))


def load_prices(env: Mapping[str, str]) -> Prices:
    """``PRICES`` from the settings (absent or empty: no prices)."""
    return parse_prices(env.get(PRICES_SETTING, ""))


def _per_million(nano_per_token: int) -> str:
    whole, fraction = divmod(nano_per_token, 1000)
    return f"{whole}.{fraction:03d}".rstrip("0").rstrip(".")


def dump_prices(prices: Prices) -> str:
    """``prices`` as the ``PRICES`` JSON that ``parse_prices`` reads back into an equal object."""
    def rates(r: Rates) -> dict[str, str]:
        return {name: _per_million(getattr(r, name)) for name in _RATES}

    def entry(e: PriceEntry) -> dict[str, Any]:
        item: dict[str, Any] = {"currency": e.currency, **rates(e.rates)}
        if e.effective_from is not None:
            item["effective_from"] = e.effective_from.isoformat()
        if e.backends:
            item["backends"] = {name: rates(r) for name, r in e.backends.items()}
        return item

    return json.dumps({name: [entry(e) for e in history] for name, history in prices.entries.items()})


def format_cost(nano: int) -> str:
    """Nano-units as a decimal string in currency units: at least 2 decimals, at most 9, exact."""
    sign = "-" if nano < 0 else ""
    units, fraction = divmod(abs(nano), NANO)
    decimals = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{units}.{decimals}"


def parse_amount(text: str) -> int:
    """An amount of money in currency units (``"12.50"``, at most 9 decimals) as nano-units."""
    value = text.strip()
    if not _AMOUNT.fullmatch(value):
        raise ValueError(f"{text!r} is not an amount like 12.50 (at most 9 decimal places)")
    units, _, fraction = value.partition(".")
    return int(units) * NANO + int(fraction.ljust(9, "0"))
