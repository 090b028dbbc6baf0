"""The clients of a T31 run: bounded concurrent loops sending a seeded mix of
requests through the ingresses, each outcome one line of the history
(analytics.billing_audit.HistoryEntry, JSONL).

The mix: whole streams (with and without usage chunks), streams the client
leaves after k events, whole answers, whole answers the client gives up on
before the headers (no request id ever seen), and requests refused before
any replica: a key no tenant has, a model nobody serves, and the limits of
the limited tenants (requests per minute, concurrency, budget)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import msgspec

from analytics.billing_audit import HistoryEntry

MODEL = "switchyard-tiny"
# A key of the right shape that no tenant holds.
BAD_KEY = "sy-0000000000000000-" + "x" * 43
KINDS = (("stream", 30), ("stream_cut", 20), ("whole", 30), ("whole_cut", 5),
         ("bad_key", 5), ("unknown_model", 5))
REQUEST_TIMEOUT_S = 60.0
PROMPTS = ("Tell me about the railway yard.", "Count the wagons on track nine, please.",
           "What does the signal box do at night?", "Summarise the timetable for Monday.")


@dataclass(frozen=True)
class TenantKey:
    tenant_id: str
    key: str
    # How often the clients pick it, relative to the others.
    weight: int


_decode_chunk = msgspec.json.Decoder(dict).decode
_encode_entry = msgspec.json.Encoder().encode


class History:
    """The history file: one JSON line per finished request, flushed as written."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = path.open("ab")
        self.count = 0

    def add(self, entry: HistoryEntry) -> None:
        self._file.write(_encode_entry(entry) + b"\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()


class Clients:
    def __init__(self, urls: list[str], tenants: list[TenantKey], history: History,
                 rng: random.Random) -> None:
        self.urls = urls
        self.tenants = tenants
        self.history = history
        self.rng = rng

    async def run(self, concurrency: int, until_s: float) -> None:
        """`concurrency` client loops until the monotonic time `until_s`."""
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(self._loop(http, until_s))

    async def _loop(self, http: aiohttp.ClientSession, until_s: float) -> None:
        while time.monotonic() < until_s:
            await self.one(http)
            await asyncio.sleep(self.rng.uniform(0.0, 0.05))

    async def one(self, http: aiohttp.ClientSession) -> None:
        rng = self.rng
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        tenant = rng.choices(self.tenants, [t.weight for t in self.tenants])[0]
        key, tenant_id = tenant.key, tenant.tenant_id
        if kind == "bad_key":
            key, tenant_id = BAD_KEY, ""
        route = rng.choice(("chat", "completions"))
        stream = kind.startswith("stream")
        max_tokens = rng.randint(4, 80)
        body: dict[str, Any] = {"model": "no-such-model" if kind == "unknown_model" else MODEL,
                                "max_tokens": max_tokens, "stream": stream,
                                "ignore_eos": rng.random() < 0.5}
        prompt = rng.choice(PROMPTS)
        if route == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        entry = HistoryEntry(request_id="", tenant_id=tenant_id, stream=stream, status=0,
                             max_tokens=max_tokens, started_at_s=time.time())
        url = rng.choice(self.urls) + ("/chat/completions" if route == "chat" else "/completions")
        headers = {"Authorization": f"Bearer {key}"}
        try:
            if kind == "whole_cut":
                await self._whole_cut(http, url, body, headers, entry)
            elif stream:
                cut_after = rng.randint(1, 20) if kind == "stream_cut" else None
                await self._stream(http, url, body, headers, entry, cut_after)
            else:
                await self._whole(http, url, body, headers, entry)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            entry.error_code = entry.error_code or f"client:{type(exc).__name__}"
        entry.ended_at_s = time.time()
        self.history.add(entry)

    async def _whole(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     headers: dict[str, str], entry: HistoryEntry) -> None:
        async with http.post(url, json=body, headers=headers) as resp:
            entry.status = resp.status
            entry.request_id = resp.headers.get("x-request-id", "")
            answer = _decode_chunk(await resp.read())
        if resp.status == 200:
            entry.tokens_seen = int(answer.get("usage", {}).get("completion_tokens", 0))
        else:
            entry.error_code = str((answer.get("error") or {}).get("code") or "")

    async def _whole_cut(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                         headers: dict[str, str], entry: HistoryEntry) -> None:
        """Gives up before the answer (and its headers) can arrive, mostly."""
        try:
            await asyncio.wait_for(self._whole(http, url, body, headers, entry),
                                   timeout=self.rng.uniform(0.05, 0.3))
        except TimeoutError:
            entry.cut = True

    async def _stream(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      headers: dict[str, str], entry: HistoryEntry,
                      cut_after: int | None) -> None:
        async with http.post(url, json=body, headers=headers) as resp:
            entry.status = resp.status
            entry.request_id = resp.headers.get("x-request-id", "")
            if resp.status != 200:
                answer = _decode_chunk(await resp.read())
                entry.error_code = str((answer.get("error") or {}).get("code") or "")
                return
            events = 0
            async for line in resp.content:
                payload = line.strip()
                if not payload.startswith(b"data:"):
                    continue
                payload = payload[5:].strip()
                if payload == b"[DONE]":
                    return
                chunk = _decode_chunk(payload)
                if "error" in chunk:
                    entry.error_code = str(chunk["error"].get("code") or "stream_error")
                    return
                events += 1
                if chunk.get("choices"):
                    entry.tokens_seen += 1
                if cut_after is not None and events >= cut_after:
                    entry.cut = True
                    # Closing the response drops the connection mid-stream.
                    with contextlib.suppress(Exception):
                        resp.close()
                    return
            entry.error_code = entry.error_code or "stream_ended_without_done"
