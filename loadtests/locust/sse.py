"""Reading an OpenAI-style SSE stream as it arrives, timing its tokens.

Standard library only: it runs inside locust's gevent-patched process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StreamReading:
    """What one stream delivered: time to first token, the mean gap between
    content chunks (inter-token latency as a client sees it), the text."""

    ttft_ms: float | None = None
    mean_itl_ms: float | None = None
    content_chunks: int = 0
    text: str = ""
    done: bool = False
    # The message of an error event (a stream that failed after its first byte).
    error: str = ""


def chunk_content(event: dict) -> str:
    """The text a chunk carries (chat delta or completion text); '' for role-only,
    usage-only or finish chunks."""
    parts = []
    for choice in event.get("choices") or ():
        delta = choice.get("delta")
        text = delta.get("content") if delta is not None else choice.get("text")
        if text:
            parts.append(text)
    return "".join(parts)


def read_stream(readline: Callable[[], bytes], clock_s: Callable[[], float],
                sent_s: float) -> StreamReading:
    """Reads events with `readline` (one line per call, b'' at the end) until
    `[DONE]`, an error event or the end; `sent_s`: when the request was sent,
    on `clock_s`."""
    reading = StreamReading()
    texts: list[str] = []
    first_s = last_s = 0.0
    while line := readline():
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, other fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            reading.done = True
            break
        event = json.loads(payload)
        if "error" in event:
            reading.error = str(event["error"].get("message", event["error"]))
            break
        text = chunk_content(event)
        if not text:
            continue
        now_s = clock_s()
        if reading.content_chunks == 0:
            first_s = now_s
            reading.ttft_ms = (now_s - sent_s) * 1000
        last_s = now_s
        reading.content_chunks += 1
        texts.append(text)
    if reading.content_chunks > 1:
        reading.mean_itl_ms = (last_s - first_s) * 1000 / (reading.content_chunks - 1)
    reading.text = "".join(texts)
    return reading
