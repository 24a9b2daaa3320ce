"""Content records in Blob Storage: where they are (the one home of the layout) and reading them back.

Container ``contentlog``; each blob is JSON Lines, one record per request, named
``YYYY/MM/DD/HH/<key name>/<instance>-<sequence>.jsonl`` by the request's arrival hour (UTC), so a key's
hour (or, across keys, a day) is listed by prefix and a lifecycle rule can expire old blobs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from azure.core.exceptions import ResourceNotFoundError
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from usage._config import BlobStorageConfig

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

CONTAINER = "contentlog"
#: the record's fields, in the order they are written
FIELDS = ("request_id", "time", "key_name", "deployment", "backend", "operation", "request", "choices", "usage",
          "usage_source", "status", "outcome", "truncated")


def hour_prefix(time: str, key_name: str) -> str:
    """The blob-name prefix of a record that arrived at ``time`` (UTC ISO 8601) for ``key_name``."""
    return f"{time[0:4]}/{time[5:7]}/{time[8:10]}/{time[11:13]}/{key_name}/"


def open_blob_service(
    config: BlobStorageConfig,
    *,
    credential: AsyncTokenCredential | None = None,
    session: aiohttp.ClientSession | None = None,
    **kwargs: Any,
) -> BlobServiceClient:
    """A ``BlobServiceClient`` that reuses ``session`` (not closing it) when one is given; ``kwargs`` go to
    the SDK (``retry_policy``, ...)."""
    if session is not None:
        kwargs["transport"] = AioHttpTransport(session=session, session_owner=False)
    if config.connection_string is not None:
        return BlobServiceClient.from_connection_string(config.connection_string, **kwargs)
    if credential is None:
        raise ValueError("a managed-identity blob connection needs a credential")
    assert config.blob_service_uri is not None
    return BlobServiceClient(account_url=config.blob_service_uri, credential=credential, **kwargs)


def _hours(day: date) -> list[datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return [start + timedelta(hours=h) for h in range(24)]


async def _read_hour(container: ContainerClient, prefix: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    names = [blob.name async for blob in container.list_blobs(name_starts_with=prefix)]
    for name in sorted(names):
        data = await (await container.download_blob(name)).readall()
        records.extend(json.loads(line) for line in data.splitlines() if line.strip())
    return records


async def read_records(
    service: BlobServiceClient,
    *,
    key: str,
    since: date,
    until: date,
    request_id: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """``key``'s records that arrived from ``since`` to ``until`` (included), oldest first, each request once.

    A batch whose upload failed ambiguously (written, but the answer lost) is written again: a request id
    seen twice is read once.
    """
    container = service.get_container_client(CONTAINER)
    days = [since + timedelta(days=n) for n in range((until - since).days + 1)]
    seen: dict[str, dict[str, Any]] = {}
    try:
        for index, day in enumerate(days, 1):
            progress(f"reading {day} ({index}/{len(days)}), {len(seen)} record(s) so far")
            hours = await asyncio.gather(*(
                _read_hour(container, hour_prefix(hour.isoformat(), key)) for hour in _hours(day)))
            for record in (r for hour in hours for r in hour):
                if request_id is None or record.get("request_id") == request_id:
                    seen.setdefault(str(record.get("request_id")), record)
    except ResourceNotFoundError:  # no container yet: nothing was ever recorded
        return []
    return sorted(seen.values(), key=lambda r: (str(r.get("time")), str(r.get("request_id"))))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _prompt(request: Any) -> str:
    """The last user message's text (or the prompt/input), for the table."""
    if not isinstance(request, dict):
        return ""
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return str(content or "")
    for name in ("prompt", "input"):
        if request.get(name) is not None:
            return json.dumps(request[name]) if not isinstance(request[name], str) else request[name]
    return ""


def _answer(choices: Any) -> str:
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    first = choices[0]
    if first.get("content"):
        return str(first["content"])
    calls = first.get("tool_calls") or []
    if calls:
        return "; ".join(f"{c.get('name')}({c.get('arguments')})" for c in calls if isinstance(c, dict))
    return str(first.get("refusal") or "")


def render_records(records: list[dict[str, Any]], form: str) -> str:
    """``records`` as JSON Lines (as stored) or a table with the start of each prompt and answer."""
    if form == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    if not records:
        return "no content records in this range"
    lines = [f"{'TIME':<20} {'REQUEST_ID':<32} {'DEPLOYMENT':<16} {'STATUS':>6} {'OUTCOME':<19} {'TOKENS':>7}  "
             "PROMPT → ANSWER"]
    for r in records:
        usage = r.get("usage")
        tokens = usage.get("total_tokens", 0) if isinstance(usage, dict) else 0
        mark = " [truncated]" if r.get("truncated") else ""
        lines.append(f"{str(r.get('time'))[:19]:<20} {r.get('request_id')!s:<32} {r.get('deployment')!s:<16} "
                     f"{r.get('status')!s:>6} {r.get('outcome')!s:<19} {tokens!s:>7}  "
                     f"{_clip(_prompt(r.get('request')), 40)} → {_clip(_answer(r.get('choices')), 60)}{mark}")
    return "\n".join(lines)
