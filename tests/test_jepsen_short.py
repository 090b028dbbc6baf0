"""RELIABILITY T31 `jepsen_billing_soak`, short form: `python -m
loadtests.jepsen` for RUN_S of mixed traffic under its fault schedule
(replica SIGKILLs and restarts, metering SIGKILLs, nats-server stopped 5 s,
a Redis restart, ambiguous chDB inserts), joining the session's Ray
cluster; the run's own audit (checks (a)-(e) of analytics/billing_audit.py)
must pass. The stack is the run's own (its nats-server and redis-server
too, since the faults stop them); it uses no database of the session's
Redis. `make soak-billing` is the 30-minute form."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from deploy.procs import ChildProcess, child_env
from tests.harness import PROJECT_DIR

pytestmark = pytest.mark.integration

RUN_S = 90.0
# Start-up (about 40 s here), RUN_S, quiescence, the audit, and a loaded machine.
TIMEOUT_S = RUN_S + 300.0


async def test_billing_holds_under_the_fault_schedule(tmp_path: Path, ray_cluster: None) -> None:
    import ray

    log_path = tmp_path / "jepsen.log"
    driver = ChildProcess("jepsen", [
        sys.executable, "-m", "loadtests.jepsen", "--duration-s", str(RUN_S),
        "--work", str(tmp_path / "run"), "--fault-period-s", "10",
        "--ray-address", ray.get_runtime_context().gcs_address],
        log_path, env=child_env(PYTHONPATH=str(PROJECT_DIR)))
    await driver.start()
    assert driver.proc is not None
    try:
        status = await asyncio.wait_for(driver.proc.wait(), TIMEOUT_S)
    finally:
        await driver.stop()
    log = log_path.read_text(errors="replace")
    print(log[-3_000:])
    assert status == 0, log[-3_000:]
    [summary] = [json.loads(line[4:]) for line in log.splitlines() if line.startswith("T31 {")]
    # The schedule struck each kind of fault, and the run was not idle.
    assert set(summary["faults"]) == {"replica_kill", "metering_kill", "nats_sigstop",
                                      "redis_restart"}
    assert summary["ambiguous_inserts"] > 0
    assert summary["requests_200"] > 100 and summary["requests_refused_before_upstream"] > 20
    assert summary["requests_streamed_cut"] > 10
    # Dashboards read the rollups: an ambiguous insert is not counted there twice.
    assert (summary["rollup_requests_drift"], summary["rollup_completion_tokens_drift"]) == (0, 0)
