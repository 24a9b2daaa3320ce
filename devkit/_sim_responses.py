"""The simulated region's Responses API: stored responses that exist only in the region that made them.

A create answers the response object (or streams its events: ``response.created``,
``response.in_progress``, the output item and content part, one ``response.output_text.delta`` per
output token, the ``…done`` events, then ``response.completed`` with the usage), and keeps it under
its id for the by-id routes. ``background: true`` answers ``queued`` without usage; the response is
finished (usage and all) by the ``background_polls``-th retrieve, or cancelled by ``cancel``. A
background stream's events are kept, so ``GET …?stream=true&starting_after=N`` replays those after N.

Usage is a tokenizing imitation: input tokens are ``o200k_base`` tokens of the instructions and the
input items' text, plus 4 per item and 3 per request, plus the whole of the previous response's
input and output when ``previous_response_id`` continues one (the region knows that state; the
request body does not show it). Output tokens are the output deltas, one ``o200k_base`` token each
(as the service streams them), from a story told over and over.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway._tokens import count, encoding

STORY = (" Once upon a time, a gateway relayed every token of a story about regions and failover: when"
         " eastus throttled, westus answered, and each team's usage was counted exactly once. The end.")


@functools.cache
def story_tokens() -> tuple[str, ...]:
    """The story as the deltas a region streams: one token each."""
    o200k = encoding("o200k_base")
    return tuple(o200k.decode([token]) for token in o200k.encode(STORY))


def output_deltas(tokens: int) -> list[str]:
    """The first ``tokens`` tokens of the story told over and over."""
    told = story_tokens()
    return [told[i % len(told)] for i in range(tokens)]


def _texts(item: Any) -> list[str]:
    if isinstance(item, str):
        return [item]
    if not isinstance(item, dict):
        return []
    content = item.get("content")
    texts = [v for k, v in item.items() if k in ("text", "output", "arguments", "name") and isinstance(v, str)]
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts


def input_tokens(body: dict[str, Any]) -> int:
    """What the imitation bills for a request's own input (without any previous response's)."""
    source = body.get("input")
    items = source if isinstance(source, list) else [] if source is None else [source]
    total = 3 + 4 * len(items) + sum(count(t, "gpt-4o") for item in items for t in _texts(item))
    if isinstance(body.get("instructions"), str):
        total += 4 + count(body["instructions"], "gpt-4o")
    return total


@dataclass
class Stored:
    """One response the region made."""

    document: dict[str, Any]
    words: list[str]
    events: list[bytes] = field(default_factory=list)  # a background stream's frames, for resuming
    polls: int = 0


@dataclass
class ResponsesApi:
    """The region's stored responses and how it answers the Responses API."""

    model: str = "gpt-4o-2024-08-06"
    output_tokens: int = 20
    background_polls: int = 1  # the retrieve that finds a background response finished
    stored: dict[str, Stored] = field(default_factory=dict)
    #: what each response's terminal event reported (or would have, had its stream not been cut)
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_stream: bytes = b""  # the frames of the last stream created, as sent

    def words(self) -> list[str]:
        return output_deltas(self.output_tokens)

    def usage(self, body: dict[str, Any], output: int) -> dict[str, Any]:
        prompt = input_tokens(body)
        previous = self.stored.get(str(body.get("previous_response_id")))
        if previous is not None and previous.document.get("usage"):
            prompt += previous.document["usage"]["total_tokens"]
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output}

    def create(self, body: dict[str, Any]) -> Stored:
        background = body.get("background") is True
        response_id = "resp_" + uuid.uuid4().hex + uuid.uuid4().hex[:16]
        document = {
            "id": response_id, "object": "response", "created_at": int(time.time()),
            "status": "queued" if background else "in_progress", "background": background, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": self.model, "output": [],
            "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": body.get("tools") or [], "top_p": 1.0, "truncation": "disabled", "usage": None,
            "user": None, "metadata": {}, "input": body.get("input"),
        }
        stored = Stored(document, self.words())
        self.reported[response_id] = self.usage(body, len(stored.words))
        if body.get("store", True) is not False or background:
            self.stored[response_id] = stored
        return stored

    def finish(self, stored: Stored, status: str = "completed") -> None:
        document = stored.document
        text = "".join(stored.words)
        document["status"] = status
        document["output"] = [{"id": "msg_" + document["id"][5:29], "type": "message", "status": "completed",
                               "role": "assistant",
                               "content": [{"type": "output_text", "annotations": [], "text": text}]}]
        usage = dict(self.reported[document["id"]])
        if status == "cancelled":  # nothing was generated
            usage.update(output_tokens=0, total_tokens=usage["input_tokens"])
        document["usage"] = usage

    @staticmethod
    def public(stored: Stored) -> dict[str, Any]:
        return {k: v for k, v in stored.document.items() if k != "input"}

    def retrieve(self, stored: Stored) -> dict[str, Any]:
        document = stored.document
        if document["background"] and document["status"] in ("queued", "in_progress"):
            stored.polls += 1
            if stored.polls >= self.background_polls:
                self.finish(stored)
            else:
                document["status"] = "in_progress"
        return self.public(stored)

    def events(self, stored: Stored) -> list[bytes]:
        """The whole event sequence of a streamed response, finishing it."""
        document = stored.document
        response_id = document["id"]
        item_id = "msg_" + response_id[5:29]
        frames: list[dict[str, Any]] = [
            {"type": "response.created", "response": self.public(stored)},
        ]
        document["status"] = "in_progress"
        frames.append({"type": "response.in_progress", "response": self.public(stored)})
        frames.append({"type": "response.output_item.added", "output_index": 0, "item": {
            "id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})
        frames.append({"type": "response.content_part.added", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "part": {"type": "output_text", "annotations": [], "text": ""}})
        frames += [{"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0,
                    "delta": word, "logprobs": []} for word in stored.words]
        text = "".join(stored.words)
        frames.append({"type": "response.output_text.done", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "text": text, "logprobs": []})
        part = {"type": "output_text", "annotations": [], "text": text}
        frames.append({"type": "response.content_part.done", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "part": part})
        frames.append({"type": "response.output_item.done", "output_index": 0, "item": {
            "id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}})
        self.finish(stored)
        frames.append({"type": "response.completed", "response": self.public(stored)})
        encoded = []
        for number, frame in enumerate(frames):
            payload = {"type": frame["type"], "sequence_number": number,
                       **{k: v for k, v in frame.items() if k != "type"}}
            encoded.append(f"event: {frame['type']}\ndata: ".encode()
                           + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
        if document["background"]:
            stored.events = encoded
        self.last_stream = b"".join(encoded)
        return encoded
