"""The locust suites' pure parts (SSE timing, stats checks, RSS drift), and the
wall between locust's gevent-patched process and the project's asyncio code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.locust.memory import Sample, role_totals, rss_drift
from loadtests.locust.results import EXPECTED_429, Row, problems, tenant_rps
from loadtests.locust.sse import chunk_content, read_stream
from tests.test_layering import module_imports

ROOT = Path(__file__).resolve().parent.parent
# The modules that run inside locust's process.
LOCUST_SIDE = {"loadtests.locust.locustfile", "loadtests.locust.sse"}
GEVENT_WORLD = ("locust", "gevent", "geventhttpclient")
ASYNCIO_WORLD = ("asyncio", "aiohttp", "uvloop", "ray", "nats", "redis", "router", "actors",
                 "analytics", "deploy", "scheduler")


def _chat(content: str | None) -> bytes:
    delta = "{}" if content is None else f'{{"content": "{content}"}}'
    return f'data: {{"choices": [{{"index": 0, "delta": {delta}}}]}}\n'.encode()


def _clock(times_s: list[float]) -> Iterator[float]:
    return iter(times_s)


@pytest.mark.parametrize(("lines", "times_s", "ttft_ms", "itl_ms", "chunks", "text", "done"), [
    # role chunk, then three tokens 10 ms apart; the first 50 ms after sending
    ([_chat(None), b"\n", _chat("a"), b"\n", _chat("b"), _chat("c"), b"data: [DONE]\n"],
     [0.05, 0.06, 0.07], 50.0, 10.0, 3, "abc", True),
    # a single token: a TTFT, no gap to time
    ([_chat("x"), b"data: [DONE]\n"], [0.2], 200.0, None, 1, "x", True),
    # cut off before [DONE]
    ([_chat("x"), _chat("y")], [0.1, 0.4], 100.0, 300.0, 2, "xy", False),
    # comments and blank lines are skipped; a legacy completion's text counts
    ([b": keep-alive\n", b'data: {"choices": [{"text": "hi"}]}\n', b"data: [DONE]\n"],
     [0.01], 10.0, None, 1, "hi", True),
])
def test_read_stream_times_tokens(lines: list[bytes], times_s: list[float],
                                  ttft_ms: float, itl_ms: float | None, chunks: int,
                                  text: str, done: bool) -> None:
    feed = iter(lines)
    clock = _clock(times_s)
    reading = read_stream(lambda: next(feed, b""), lambda: next(clock), sent_s=0.0)
    assert reading.ttft_ms == pytest.approx(ttft_ms)
    assert reading.mean_itl_ms == (None if itl_ms is None else pytest.approx(itl_ms))
    assert (reading.content_chunks, reading.text, reading.done) == (chunks, text, done)


def test_read_stream_stops_at_an_error_event() -> None:
    feed = iter([_chat("a"), b'data: {"error": {"message": "replica died"}}\n', _chat("b")])
    reading = read_stream(lambda: next(feed, b""), lambda: 1.0, sent_s=0.0)
    assert (reading.error, reading.text, reading.done) == ("replica died", "a", False)


@pytest.mark.parametrize(("event", "text"), [
    ({"choices": [{"delta": {"role": "assistant"}}]}, ""),
    ({"choices": [], "usage": {"completion_tokens": 3}}, ""),
    ({"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]}, "ab"),
    ({"choices": [{"text": "t", "finish_reason": None}]}, "t"),
])
def test_chunk_content(event: dict, text: str) -> None:
    assert chunk_content(event) == text


def _row(kind: str, name: str, requests: int = 10, failures: int = 0) -> tuple:
    return (kind, name), Row(kind, name, requests, failures, 1.0, 2.0, 1.0)


GOOD_ROWS = dict([_row("POST", "chat"), _row("POST", "chat stream"),
                  _row("POST", "session turn"), _row("POST", "chat (abusive tenant)"),
                  _row("TTFT", "chat stream"), _row("ITL", "chat stream"),
                  _row("TTFT", "session turn"), _row("ITL", "session turn"),
                  _row(*EXPECTED_429)])


@pytest.mark.parametrize(("change", "expected"), [
    ({}, []),
    (dict([_row("POST", "chat", failures=2)]), ["2 failures in POST chat"]),
    (dict([_row("POST", "session turn", requests=0)]), ["no session turn requests"]),
    ({("ITL", "chat stream"): None}, ["no ITL row for chat stream"]),
    ({EXPECTED_429: None}, ["the abusive tenant was never refused with 429"]),
])
def test_problems(change: dict, expected: list[str]) -> None:
    rows = {k: v for k, v in {**GOOD_ROWS, **change}.items() if v is not None}
    assert problems(rows) == expected


def _samples(rss_by_t: dict[float, list[int]]) -> list[Sample]:
    return [Sample(t, pid, "ingress", rss, 0.0) for t, values in rss_by_t.items()
            for pid, rss in enumerate(values)] + [Sample(0.0, 99, "locust", 10**6, 0.0)]


@pytest.mark.parametrize(("rss_by_t", "drift_pct"), [
    # two ingress processes summed; the warm-up's growth (t < 30) is not drift
    ({0: [100, 100], 10: [500, 500], 30: [1000, 1000], 40: [1000, 1000], 50: [1000, 1000],
      60: [1000, 1000], 70: [1000, 1000], 80: [1000, 1000]}, 0.0),
    ({30: [1000], 40: [1000], 50: [1000], 60: [1100], 70: [1200], 80: [1200]}, 20.0),
    # a lone spike at the end is outvoted by the median of the last three
    ({30: [1000], 40: [1000], 50: [1000], 60: [1000], 70: [1000], 80: [5000]}, 0.0),
])
def test_rss_drift(rss_by_t: dict[float, list[int]], drift_pct: float) -> None:
    drift = rss_drift(role_totals(_samples(rss_by_t), "ingress"), warmup_s=30.0)
    assert drift["rss_drift_pct"] == pytest.approx(drift_pct)


def test_rss_drift_needs_samples_after_the_warmup() -> None:
    assert rss_drift(role_totals(_samples({0: [1], 10: [1]}), "ingress"), 30.0) == {}


def _project_modules() -> Iterator[tuple[str, Path]]:
    for package in ("scheduler", "router", "actors", "analytics", "deploy", "loadtests"):
        for path in (ROOT / package).rglob("*.py"):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def test_no_project_module_imports_locust_and_the_locust_side_imports_no_project_code() -> None:
    for module, path in _project_modules():
        imports = module_imports(path)
        if module in LOCUST_SIDE:
            # Only the standard library, locust and the locust side itself.
            assert not {_top(m) for m in imports} & set(ASYNCIO_WORLD), module
            assert {m for m in imports if m.startswith("loadtests")} <= LOCUST_SIDE, module
        else:
            assert not {_top(m) for m in imports} & set(GEVENT_WORLD), module
            assert not imports & LOCUST_SIDE - {"loadtests.locust.sse"}, module


def _loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    probe = (f"import sys, {module}; "
             f"print(','.join(m for m in {watched!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    return [m for m in out.split(",") if m]


def test_the_locustfile_loads_no_asyncio_library() -> None:
    assert _loaded_after_import("loadtests.locust.locustfile", ASYNCIO_WORLD) == []


def test_the_driver_loads_no_gevent() -> None:
    assert _loaded_after_import("loadtests.locust.run", GEVENT_WORLD) == []


def test_pytest_runs_without_locust() -> None:
    """locust's pytest plugin is disabled (pyproject's addopts) and nothing here
    imported locust: gevent's patching would break every asyncio test."""
    assert not [m for m in GEVENT_WORLD if m in sys.modules]


def test_tenant_rps_counts_the_tenant_users_successes() -> None:
    rows = {**GOOD_ROWS, **dict([_row("POST", "chat", requests=10, failures=5)])}
    # chat: half of 1/s; chat stream and session turn: 1/s each; the abusive tenant's is apart
    assert tenant_rps(rows) == pytest.approx(2.5)
