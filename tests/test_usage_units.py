"""Units of the ingress's metering: clamping reported usage, stripping the
usage the client did not ask for, assembling a non-streaming answer from a
stream (against the simulator's vLLM shapes and captured vLLM chunks), and
the disk spool."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import pytest

from loadtests.simulator.shapes import ChatShape, CompletionShape, ResponseContext, UsageCounts
from router.assemble import Assembler
from router.metrics import Metrics
from router.spool import UsageSpool
from router.upstream import strip_usage
from scheduler.usage_clamp import (
    ABSURD_COMPLETION_TOKENS,
    CACHED_OVER_PROMPT,
    COMPLETION_OVER_MAX,
    MISSING,
    NEGATIVE,
    PROMPT_OVER_BOUND,
    Billed,
    Reported,
    clamp_usage,
    prompt_tokens_bound,
)
from scheduler.wire import UsageEvent

SAMPLES = Path(__file__).parent / "data" / "vllm_samples"

# --- clamping ------------------------------------------------------------------------------

BOUND, EST = 100, 40


@pytest.mark.parametrize(("reported", "max_tokens", "seen", "billed", "anomalies"), [
    (Reported(30, 10, 16), 16, 10, Billed(30, 10, 16), ()),
    (Reported(30, 16, 0), 16, 16, Billed(30, 16, 0), ()),
    (Reported(30, 17, 0), 16, 17, Billed(30, 16, 0), (COMPLETION_OVER_MAX,)),
    (Reported(30, 10**12, 0), 0, 5, Billed(30, ABSURD_COMPLETION_TOKENS, 0),
     (COMPLETION_OVER_MAX,)),
    (Reported(30, 5000, 0), 0, 5000, Billed(30, 5000, 0), ()),
    (Reported(-3, 4, -1), 16, 4, Billed(0, 4, 0), (NEGATIVE,)),
    (Reported(30, -4, 2), 16, 0, Billed(30, 0, 2), (NEGATIVE,)),
    (Reported(10**9, 4, 0), 16, 4, Billed(BOUND, 4, 0), (PROMPT_OVER_BOUND,)),
    (Reported(30, 4, 31), 16, 4, Billed(30, 4, 30), (CACHED_OVER_PROMPT,)),
    (Reported(10**9, 99, 10**9), 16, 4, Billed(BOUND, 16, BOUND),
     (PROMPT_OVER_BOUND, CACHED_OVER_PROMPT, COMPLETION_OVER_MAX)),
    (None, 16, 7, Billed(EST, 7, 0), (MISSING,)),
    (None, 5, 7, Billed(EST, 5, 0), (MISSING,)),
])
def test_clamp_table(reported: Reported | None, max_tokens: int, seen: int, billed: Billed,
                     anomalies: tuple[str, ...]) -> None:
    got = clamp_usage(reported, prompt_bound_tokens=BOUND, prompt_est_tokens=EST,
                      max_tokens=max_tokens, seen_completion_tokens=seen)
    assert got == (billed, anomalies)
    total = got[0].prompt_tokens + got[0].completion_tokens
    assert total <= BOUND + (max_tokens or ABSURD_COMPLETION_TOKENS)


@pytest.mark.parametrize(("prompt_bytes", "messages", "bound"), [
    (0, 1, 72), (10, 2, 90), (4096, 1, 4168)])
def test_prompt_bound(prompt_bytes: int, messages: int, bound: int) -> None:
    assert prompt_tokens_bound(prompt_bytes, messages) == bound


# --- usage stripped from chunks ------------------------------------------------------------


def _sample_chunks(name: str) -> list[bytes]:
    lines = (SAMPLES / name).read_bytes().split(b"\n")
    return [line[6:] for line in lines if line.startswith(b"data: ") and line != b"data: [DONE]"]


@pytest.mark.parametrize("name", ["chat_stream_continuous_usage.txt",
                                  "chat_stream_include_usage.txt", "completion_stream.txt"])
def test_strip_usage_removes_exactly_the_usage_field(name: str) -> None:
    for chunk in _sample_chunks(name):
        before = json.loads(chunk)
        after = strip_usage(chunk)
        expected = {k: v for k, v in before.items() if k != "usage"}
        assert json.loads(after) == expected
        assert list(json.loads(after)) == list(expected)


@pytest.mark.parametrize("chunk", [
    b'{"id":"x","usage": {"prompt_tokens":1},"choices":[]}',
    b'{"usage":{"prompt_tokens":1,"note":"}"},"id":"x"}',
    b'{"id":"x","choices":[{"text":"the usage is \\"usage\\""}]}',
])
def test_strip_usage_other_layouts(chunk: bytes) -> None:
    expected = {k: v for k, v in json.loads(chunk).items() if k != "usage"}
    assert json.loads(strip_usage(chunk)) == expected


# --- assembling a non-streaming answer -----------------------------------------------------

CTX = ResponseContext("chatcmpl-abc", 1795404020, "switchyard-tiny", "vllm-0.32.0-x",
                      include_usage=True)
USAGE = UsageCounts(prompt_tokens=29, completion_tokens=3, cached_tokens=16,
                    created_cache_tokens=0)


@pytest.mark.parametrize("shape", [ChatShape(), CompletionShape()])
def test_assembled_answer_equals_the_simulators_full_answer(shape) -> None:
    texts, reasons = ["He", "llo", " you"], [None, None, "length"]
    ctx = ResponseContext(shape.id_prefix + "abc", CTX.created_s, CTX.model,
                          CTX.system_fingerprint, include_usage=True)
    chunks = list(shape.opening_chunks(ctx, USAGE))
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        counts = dataclasses.replace(USAGE, completion_tokens=i + 1)
        chunks.append(shape.token_chunk(ctx, text, reason, counts))
    chunks.append(shape.usage_chunk(ctx, USAGE))
    assembler = Assembler("chat" if isinstance(shape, ChatShape) else "completions")
    for chunk in chunks:
        assembler.add(msgspec.json.encode(chunk))
    full = shape.full_response(ctx, "".join(texts), "length", USAGE)
    assert msgspec.json.encode(full) == assembler.body()


def test_assembled_from_captured_vllm_chunks_has_vllms_shape() -> None:
    assembler = Assembler("chat")
    chunks = _sample_chunks("chat_stream_continuous_usage.txt")
    for chunk in chunks:
        assembler.add(chunk)
    body = json.loads(assembler.body())
    captured = json.loads((SAMPLES / "chat.json").read_text())
    assert list(body) == list(captured)
    assert list(body["choices"][0]) == list(captured["choices"][0])
    assert list(body["choices"][0]["message"]) == list(captured["choices"][0]["message"])
    last = json.loads(chunks[-1])
    assert body["usage"]["completion_tokens"] == last["usage"]["completion_tokens"]
    text = "".join(json.loads(c)["choices"][0]["delta"].get("content", "")
                   for c in chunks if json.loads(c)["choices"])
    assert body["choices"][0]["message"]["content"] == text


# --- the disk spool ------------------------------------------------------------------------


def _event(i: int) -> UsageEvent:
    return UsageEvent(request_id=f"req-{i}", tenant_id="t", key_id="k", model="m",
                      prompt_tokens=i, completion_tokens=2 * i)


async def test_spool_keeps_events_across_a_restart_once_each(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "usage.sqlite"
    spool = UsageSpool(path, max_events=5, metrics=Metrics())
    await spool.start()
    await spool.put([_event(i) for i in range(3)])
    await spool.put([_event(2), _event(3)])  # a repeat of req-2 is stored once
    assert spool.depth_events == 4 and not spool.full()
    await spool.aclose()

    again = UsageSpool(path, max_events=5, metrics=Metrics())
    await again.start()
    assert again.depth_events == 4
    assert [e.request_id for e in await again.oldest(10)] == [f"req-{i}" for i in range(4)]
    await again.put([_event(4)])
    assert again.full()
    await again.delete(["req-0", "req-2"])
    assert [e for e in await again.oldest(2)] == [_event(1), _event(3)]
    assert again.depth_events == 3 and not again.full()
    await again.aclose()
