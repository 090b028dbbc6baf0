"""The fault schedule of a T31 run: every `period_s` the next fault in turn,
each one healed before the next starts (the stack is whole again between
them). Ambiguous ClickHouse inserts run all along, in the metering process
(loadtests/jepsen/metering.py). Each fault is logged with its times."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loadtests.jepsen.stack import Stack

REPLICA_DOWN_S = 2.0
NATS_STOPPED_S = 5.0
REDIS_DOWN_S = 1.0


@dataclass
class FaultLog:
    # (name, detail, started at, healed at), wall-clock seconds.
    entries: list[tuple[str, str, float, float]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for name, *_ in self.entries:
            found[name] = found.get(name, 0) + 1
        return found


class FaultSchedule:
    def __init__(self, stack: Stack, rng: random.Random, period_s: float) -> None:
        self.stack = stack
        self.rng = rng
        self.period_s = period_s
        self.log = FaultLog()
        # Every kind within the first four, so a short run strikes each.
        self._faults: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("replica_kill", self.replica_kill),
            ("redis_restart", self.redis_restart),
            ("nats_sigstop", self.nats_sigstop),
            ("metering_kill", self.metering_kill),
            ("replica_kill", self.replica_kill),
        ]

    async def run(self, until_s: float) -> None:
        """Faults in turn until the monotonic time `until_s` (the last one is
        healed even if that runs past it)."""
        turn = 0
        while time.monotonic() + self.period_s < until_s:
            await asyncio.sleep(self.period_s * self.rng.uniform(0.5, 1.0))
            name, fault = self._faults[turn % len(self._faults)]
            turn += 1
            started_s = time.time()
            detail = await fault()
            self.log.entries.append((name, detail, started_s, time.time()))
            print(f"fault {name} {detail} healed after {time.time() - started_s:.1f} s",
                  flush=True)

    async def replica_kill(self) -> str:
        index = self.rng.randrange(len(self.stack.replica_procs))
        await self.stack.kill(self.stack.replica_procs[index])
        await asyncio.sleep(REPLICA_DOWN_S)
        await self.stack.start_replica(index)
        return self.stack.replica_id(index)

    async def metering_kill(self) -> str:
        assert self.stack.metering is not None
        await self.stack.kill(self.stack.metering)
        await self.stack.start_metering()
        return "SIGKILL"

    async def nats_sigstop(self) -> str:
        assert self.stack.nats is not None and self.stack.nats.pid is not None
        pid = self.stack.nats.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(NATS_STOPPED_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"{NATS_STOPPED_S:.0f} s"

    async def redis_restart(self) -> str:
        await self.stack.restart_redis(REDIS_DOWN_S)
        return "SIGTERM, AOF reload"
