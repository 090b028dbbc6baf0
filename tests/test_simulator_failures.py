"""The simulator when things go wrong: clients that leave, full engines,
injected faults (POST /sim/faults), crashes, and the CLI process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import msgspec
import pytest

from loadtests.simulator import SimFleet, SimReplica, start_fleet
from tests.sim_helpers import (
    BASE_LABELS,
    CFG,
    LONG_MAX_TOKENS,
    REPO_ROOT,
    chat_body,
    completion_body,
    fleet,
    ground_truth,
    http,
    poll_until,
    post_json,
    scrape,
    serve,
)

__all__ = ["fleet", "http"]  # fixtures


async def test_client_disconnect_aborts_the_request(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    max_tokens = LONG_MAX_TOKENS
    body = chat_body(max_tokens=max_tokens, ignore_eos=True, stream=True)
    headers = {"X-Request-Id": "gone"}
    response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    try:
        for _ in range(2):
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        async with http.get(f"{url}/load") as load:
            assert await load.json() == {"server_load": 1}
    finally:
        response.close()

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "gone"))["aborted"])

    await poll_until(aborted)
    truth = await ground_truth(http, url, "gone")
    assert truth["finished"] and truth["finish_reason"] == "abort"
    assert 1 <= truth["completion_tokens"] < max_tokens
    samples = await scrape(http, url)
    abort_labels = BASE_LABELS | {("finished_reason", "abort")}
    assert samples[("vllm:request_success_total", abort_labels)] == 1
    assert samples[("vllm:generation_tokens_total", BASE_LABELS)] == truth["completion_tokens"]
    assert samples[("vllm:num_requests_running", BASE_LABELS)] == 0


async def test_cancelled_non_stream_request_is_aborted(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    replica = fleet.replicas[0]
    body = completion_body(max_tokens=LONG_MAX_TOKENS, ignore_eos=True)
    headers = {"X-Request-Id": "nb"}
    client = asyncio.create_task(post_json(http, f"{url}/v1/completions", body, **headers))

    async def generating() -> bool:
        record = replica.ledger.get("nb")
        return record is not None and record.completion_tokens > 0

    await poll_until(generating)
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "nb"))["aborted"])

    await poll_until(aborted)
    assert replica.engine.num_running == 0 and replica.engine.pool.usage() == 0


async def test_requests_beyond_the_running_limit_wait(http: aiohttp.ClientSession) -> None:
    replica = SimReplica(msgspec.structs.replace(CFG, max_num_seqs=1))
    async with serve(replica) as url:
        long_body = completion_body(max_tokens=LONG_MAX_TOKENS, ignore_eos=True, stream=True)
        first = await http.post(f"{url}/v1/completions", json=long_body)
        await first.content.readuntil(b"\n\n")
        short_body = completion_body(max_tokens=1)
        second = asyncio.create_task(post_json(http, f"{url}/v1/completions", short_body))

        async def one_waiting() -> bool:
            return replica.gauges().num_waiting == 1

        await poll_until(one_waiting)
        assert replica.server_load() == 2
        first.close()
        reply = await second
        assert reply["usage"]["completion_tokens"] == 1
        assert replica.stats.queue_s.count == 2 and replica.stats.queue_s.sum > 0


async def test_fleet_serves_each_replica_on_its_own_port(http: aiohttp.ClientSession) -> None:
    fleet = await start_fleet(msgspec.structs.replace(CFG, replicas=2), ports=[0, 0])
    try:
        assert len(set(fleet.urls)) == 2 and len(fleet.replicas) == 2
        body = completion_body(max_tokens=3, ignore_eos=True)
        replies = [await post_json(http, f"{url}/v1/completions", body) for url in fleet.urls]
        # Same seed, same prompt: the same answer on either replica.
        assert replies[0]["choices"][0]["text"] == replies[1]["choices"][0]["text"]
        assert [replica.stats.generation_tokens for replica in fleet.replicas] == [3, 3]
    finally:
        await fleet.aclose()


async def test_time_scale_shrinks_simulated_time(http: aiohttp.ClientSession) -> None:
    # 20 steps of 50 ms each would take a second; at a 100th of that, 10 ms.
    cfg = msgspec.structs.replace(CFG, decode_ms_per_token=50.0, time_scale=0.01)
    async with serve(SimReplica(cfg)) as url:
        started_s = time.monotonic()
        await post_json(http, f"{url}/v1/completions", completion_body(max_tokens=20,
                                                                        ignore_eos=True))
        assert time.monotonic() - started_s < 0.5


# --- faults -------------------------------------------------------------------


async def set_faults(http: aiohttp.ClientSession, url: str, **faults: object) -> None:
    assert (await post_json(http, f"{url}/sim/faults", faults)) == faults


async def can_connect(url: str) -> bool:
    """A health check over a fresh connection (pooled ones would hide a closed listener)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.get(f"{url}/health") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False


async def test_error_status_and_slow_start(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(http, url, error_status=503)
    async with http.post(f"{url}/v1/chat/completions", json=chat_body()) as response:
        assert response.status == 503
        error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("ServiceUnavailableError", 503)
    async with http.get(f"{url}/sim/faults") as response:
        assert await response.json() == {"error_status": 503}
    await set_faults(http, url, slow_start_s=0.3)
    async with http.get(f"{url}/health") as response:
        assert response.status == 503
    await poll_until(lambda: can_connect(url))
    await post_json(http, f"{url}/v1/chat/completions", chat_body(max_tokens=1))


@pytest.mark.parametrize("body", [{"error_status": 404}, {"nope": 1}, {"stall_after_tokens": -1}])
async def test_bad_fault_bodies_are_400(
    fleet: SimFleet, http: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    async with http.post(f"{fleet.urls[0]}/sim/faults", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "BadRequestError"


async def test_hang_before_the_first_byte(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(http, url, hang_before_first_byte=True)
    with pytest.raises(asyncio.TimeoutError):
        await http.post(f"{url}/v1/completions", json=completion_body(),
                        headers={"X-Request-Id": "hung"}, timeout=aiohttp.ClientTimeout(total=0.2))

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "hung"))["aborted"])

    await poll_until(aborted)
    assert (await ground_truth(http, url, "hung"))["completion_tokens"] == 0


async def test_stall_after_tokens(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(http, url, stall_after_tokens=3)
    body = chat_body(max_tokens=50, ignore_eos=True, stream=True)
    response = await http.post(f"{url}/v1/chat/completions", json=body,
                               headers={"X-Request-Id": "stalled"})
    try:
        for _ in range(1 + 3):  # the role chunk, then three tokens
            await response.content.readuntil(b"\n\n")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=0.2)
        replica = fleet.replicas[0]
        assert replica.engine.num_running == 0 and replica.engine.pool.usage() == 0
        assert not (await ground_truth(http, url, "stalled"))["finished"]
    finally:
        response.close()

    async def aborted() -> bool:
        return bool((await ground_truth(http, url, "stalled"))["aborted"])

    await poll_until(aborted)
    assert (await ground_truth(http, url, "stalled"))["completion_tokens"] == 3


async def test_refused_connections_come_back(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(http, url, refuse_connections_s=0.3)
    assert not await can_connect(url)
    await poll_until(lambda: can_connect(url))
    assert fleet.urls[0] == url


async def test_crash_resets_streams_and_stops_listening(http: aiohttp.ClientSession) -> None:
    fleet = await start_fleet(CFG, ports=[0])
    try:
        url = fleet.urls[0]
        body = chat_body(max_tokens=LONG_MAX_TOKENS, ignore_eos=True, stream=True)
        stream = await http.post(f"{url}/v1/chat/completions", json=body,
                                 headers={"X-Request-Id": "cut"})
        await stream.content.readuntil(b"\n\n")
        record = fleet.replicas[0].ledger.get("cut")
        async with aiohttp.ClientSession() as admin:
            await set_faults(admin, url, crash=True)
        with pytest.raises(aiohttp.ClientError):
            while await stream.content.readuntil(b"\n\n"):
                pass
        stream.close()
        await asyncio.wait_for(fleet.wait_all_crashed(), timeout=5)
        assert not await can_connect(url)
        assert record is not None and record.aborted and record.completion_tokens >= 1
    finally:
        await fleet.aclose()


# --- the CLI ----------------------------------------------------------------------


async def start_cli(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m loadtests.simulator` with one replica on a free port; (process, URL)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests.simulator", "--replicas", "1", "--base-port", "0",
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
    assert line.startswith("replica 0 listening on http://127.0.0.1:"), line
    return proc, line.rsplit(" ", 1)[1].strip()


async def test_cli_prints_urls_and_stops_on_sigterm() -> None:
    proc, url = await start_cli("--model", "cli-model")
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as response:
            assert (await response.json())["data"][0]["id"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_exits_when_its_replica_crashes() -> None:
    proc, url = await start_cli()
    try:
        async with aiohttp.ClientSession() as session:
            await set_faults(session, url, crash=True)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
