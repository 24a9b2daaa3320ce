"""Reading the client's request on its own: the query filter, token caps, body encodings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import BadRequest
from gateway._request import completion_reservation, parse_body, upstream_query

SECRET = "gw-SECRET"
KEY_SPELLINGS = [
    "api-key", "API-KEY", "Api-Key", "api_key", "apikey", "api+key", "api%20key",
    "api-%6Bey", "api-%6bey", "%61%70%69%2D%6B%65%79",  # percent-encoded once
    "api-%256Bey", "api-%25256Bey", "api%252Dkey",  # encoded twice, three times
    "api-key%00", "%00api-key", "api-key%20",
    "api-%EF%BD%8Bey",  # a fullwidth k (NFKC: k)
    "subscription-key", "Subscription-Key", "subscription_key", "Ocp-Apim-Subscription-Key",
    "ocp-apim-subscription-key", "key", "KEY", "%6Bey", "code", "CODE", "authorization", "access_token",
]


@pytest.mark.parametrize("name", KEY_SPELLINGS)
def test_query_secret_names_are_dropped_however_encoded(name: str) -> None:
    """A secret-carrying name is dropped in every spelling a backend could decode it to."""
    query, api_version = upstream_query(f"api-version=2024-10-21&{name}={SECRET}&b=2".encode())
    assert SECRET not in query
    assert query == "api-version=2024-10-21&b=2"
    assert api_version == "2024-10-21"


def test_query_is_rebuilt_from_decoded_pairs() -> None:
    """Kept pairs are re-encoded canonically: separators hidden in values cannot split upstream."""
    query, api_version = upstream_query(b"api-version=2024-10-21&note=a%3Bapi-key%3Dx&flag&p=a+b&e=%C3%A9")
    assert query == "api-version=2024-10-21&note=a%3Bapi-key%3Dx&flag&p=a%20b&e=%C3%A9"
    assert api_version == "2024-10-21"


def test_query_with_odd_bytes_is_kept_byte_exact() -> None:
    """NUL, invalid UTF-8, bare '%' and raw high bytes are passed on encoded, without error."""
    query, api_version = upstream_query(b"x=%00%FF&%FF=1&bad=%zz&raw=\xff\x7f&&=v&api-version=")
    assert query == "x=%00%FF&%FF=1&bad=%25zz&raw=%FF%7F&=v&api-version="
    assert api_version == ""


def test_query_without_api_version() -> None:
    """No query gives an empty query and no api-version; the first api-version counts."""
    assert upstream_query(b"") == ("", None)
    assert upstream_query(b"API-Version=1&api-version=2") == ("API-Version=1&api-version=2", "1")


def test_query_name_that_never_stops_decoding_is_dropped() -> None:
    """A name nested in more escapes than the filter unwraps is dropped rather than trusted."""
    name = "api-key"
    for _ in range(12):
        name = name.replace("%", "%25").replace("k", "%6B")
    assert upstream_query(f"{name}={SECRET}&a=1".encode())[0] == "a=1"


@pytest.mark.parametrize(("body", "reserved"), [
    ({}, 0),
    ({"max_tokens": 5000, "max_completion_tokens": None}, 5000),
    ({"max_tokens": None, "max_completion_tokens": 5000}, 5000),
    ({"max_tokens": 5000, "max_completion_tokens": 10}, 5000),
    ({"max_tokens": 10, "max_completion_tokens": 5000}, 5000),
    ({"max_tokens": 0}, 0),
    ({"max_tokens": 100, "n": 3}, 300),
    ({"max_tokens": 100, "n": None}, 100),
])
def test_reservation_takes_the_largest_cap_set(body: dict[str, Any], reserved: int) -> None:
    """A null cap is not set; of the caps set, the largest counts, times n."""
    assert completion_reservation(body) == reserved


@pytest.mark.parametrize("body", [
    {"max_tokens": 5000.0}, {"max_tokens": 1.5}, {"max_tokens": -1}, {"max_tokens": True},
    {"max_tokens": "5000"}, {"max_completion_tokens": [5000]}, {"max_tokens": 10, "max_completion_tokens": -5},
    {"max_tokens": 10, "n": 0}, {"max_tokens": 10, "n": 2.0}, {"max_tokens": 10, "n": False},
])
def test_reservation_refuses_caps_that_are_not_whole_numbers(body: dict[str, Any]) -> None:
    """A cap or n that is not a whole number in range is a 400 naming the field."""
    with pytest.raises(BadRequest) as caught:
        completion_reservation(body)
    assert caught.value.status == 400
    assert any(f"'{name}'" in caught.value.message for name in body)


DOCUMENT = {"messages": [{"role": "user", "content": "héllo"}], "stream": True}


@pytest.mark.parametrize(("encoding", "named"), [
    ("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
    ("utf-32", "UTF-32"), ("utf-32-le", "UTF-32"), ("utf-32-be", "UTF-32"), ("latin-1", "not valid UTF-8"),
])
def test_bodies_not_in_utf8_are_refused_by_name(encoding: str, named: str) -> None:
    """UTF-16, UTF-32 (with or without BOM) and Latin-1 bodies get a 400 that says what is wrong."""
    with pytest.raises(BadRequest) as caught:
        parse_body(json.dumps(DOCUMENT, ensure_ascii=False).encode(encoding))
    assert caught.value.code == "UnsupportedEncoding"
    assert named in caught.value.message and "UTF-8" in caught.value.message


def test_utf8_body_is_kept_and_its_bom_dropped() -> None:
    """UTF-8 bodies pass as sent; a byte order mark in front is taken off."""
    raw = json.dumps(DOCUMENT, ensure_ascii=False).encode()
    assert parse_body(raw) == (DOCUMENT, raw)
    assert parse_body(b"\xef\xbb\xbf" + raw) == (DOCUMENT, raw)
