"""The stack's Ray actors, created or attached by name, and kept alive.

Each actor is named in `ray.namespace` and created with `get_if_exists`, so
a driver that starts again attaches to the actors already there instead of
creating twins. With an external cluster (`ray.address`) they are detached:
they outlive the driver that made them. Ownership: a driver that stops
cleanly (`up` on SIGINT/SIGTERM, or this module's `run`) stops and kills
them; a driver that crashed leaves them serving, for the next one to attach
(`python -m deploy.stack_actors kill` removes them instead).

The supervisor asks every actor `ready()` each `ray.supervise_interval_s`.
When some do not answer within `ray.call_timeout_s` it asks the cluster for
its named actors: if that answers, the missing ones are created again (the
rest attached); if not, Ray itself is gone, and the driver drops its session
and joins again (or starts a new local head) until it can, then creates or
attaches every actor. Services keep their state in Redis and NATS, so a
re-created quota shard reads its tenants back and a scheduler reloads the
registry.

`python -m deploy.stack_actors --config PATH run|status|kill` hosts the
actors apart from `up` (metering, schedulers, quota shards, webhooks; the
replica agents stay with the replicas `up` starts), prints what it did as
JSON lines, and answers what lives in the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.ray_runtime import in_daemon_thread, init_ray, named_actors, reconnect_ray
from deploy.procs import StartFailed
from scheduler.config import Config, dump_config, load_config

log = logging.getLogger("switchyard.actors")
ACTOR_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ActorSpec:
    name: str  # its Ray name, in ray.namespace
    label: str  # how errors name it
    shell: str  # its class in actors/ray_shells.py
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def stack_specs(cfg: Config) -> list[list[ActorSpec]]:
    """The stack's actors but the replica agents, in start order: each group
    is ready before the next starts (webhooks bind to metering's stream)."""
    config_json = dump_config(cfg)
    port = cfg.scheduler.metrics_port
    first = [ActorSpec("switchyard-metering", "metering actor", "MeteringActor", (config_json,))]
    for i in range(cfg.scheduler.actors):
        name = f"switchyard-scheduler-{i}"
        first.append(ActorSpec(name, f"scheduler actor {i}", "SchedulerActor",
                               (config_json, name, port + i if port else 0)))
    first += [ActorSpec(f"switchyard-quota-{i}", f"quota shard {i}", "QuotaShardActor",
                        (config_json, i)) for i in range(cfg.quota.shards)]
    if not cfg.webhooks.url:
        return [first]
    return [first, [ActorSpec("switchyard-webhooks", "webhook actor", "WebhookActor",
                              (config_json,))]]


def _log_report(event: str, fields: dict[str, Any]) -> None:
    log.info("%s %s", event, json.dumps(fields))


class StackActors:
    def __init__(self, cfg: Config, report: Report = _log_report) -> None:
        self.cfg = cfg
        self.detached = bool(cfg.ray.address)
        self.specs: dict[str, ActorSpec] = {}
        self.handles: dict[str, Any] = {}
        self._report = report
        self._supervisor: asyncio.Task[None] | None = None
        self.recoveries = 0

    async def ensure(self, specs: Sequence[ActorSpec]) -> list[Any]:
        """Creates each actor or attaches to the live one of its name; returns
        their handles once each answers `ready()` (StartFailed naming it if not)."""
        from actors import ray_shells

        existing = await in_daemon_thread(named_actors)
        handles = []
        for spec in specs:
            shell = getattr(ray_shells, spec.shell)
            handle = shell.options(
                name=spec.name, namespace=self.cfg.ray.namespace, get_if_exists=True,
                lifetime="detached" if self.detached else None,
            ).remote(*spec.args, **spec.kwargs)
            self.specs[spec.name] = spec
            self.handles[spec.name] = handle
            handles.append(handle)
        for spec, handle in zip(specs, handles, strict=True):
            try:
                await asyncio.wait_for(handle.ready.remote(), ACTOR_READY_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - reported with the part's name
                raise StartFailed(f"{spec.label} failed to start: {exc}") from None
        self._report("actors_ready", {
            "attached": sorted(s.name for s in specs if s.name in existing),
            "created": sorted(s.name for s in specs if s.name not in existing)})
        return handles

    def supervise(self) -> None:
        """Starts checking the actors ensured so far (and any ensured later)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="actor-supervisor")

    async def aclose(self) -> None:
        """Stops the supervisor and every actor's service; kills detached actors
        (nobody else will), which a local head's driver leaves to Ray's shutdown."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for handle in reversed(self.handles.values()):
            with contextlib.suppress(Exception):  # stopping anyway
                await asyncio.wait_for(handle.stop.remote(), STOP_TIMEOUT_S)
        if self.detached:
            import ray

            for handle in self.handles.values():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(in_daemon_thread(lambda h=handle: ray.kill(h)),
                                           self.cfg.ray.call_timeout_s)

    async def silent(self) -> list[str]:
        """The actors that did not answer `ready()` within `ray.call_timeout_s`."""
        async def answers(handle: Any) -> bool:
            try:
                await asyncio.wait_for(handle.ready.remote(), self.cfg.ray.call_timeout_s)
            except Exception:  # noqa: BLE001 - any failure is "not answering"
                return False
            return True

        names = list(self.handles)
        results = await asyncio.gather(*(answers(self.handles[n]) for n in names))
        return [name for name, ok in zip(names, results, strict=True) if not ok]

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ray.supervise_interval_s)
            silent = await self.silent()
            if silent:
                self._report("actors_silent", {"names": silent})
                await self._recover(time.monotonic())

    async def _recover(self, since_s: float) -> None:
        """Creates or attaches every actor again, rejoining Ray first when it
        is gone; tries every `supervise_interval_s` until it succeeds."""
        while True:
            try:
                if not await self._ray_answers():
                    self._report("ray_lost", {})
                    await in_daemon_thread(lambda: reconnect_ray(self.cfg.ray))
                    self._report("ray_joined", {"after_s": round(time.monotonic() - since_s, 3)})
                await self.ensure(list(self.specs.values()))
            except Exception as exc:  # noqa: BLE001 - Ray's errors are many; try again
                log.warning("actors not back yet: %r", exc)
                await asyncio.sleep(self.cfg.ray.supervise_interval_s)
                continue
            self.recoveries += 1
            self._report("recovered", {"after_s": round(time.monotonic() - since_s, 3)})
            return

    async def _ray_answers(self) -> bool:
        try:
            await asyncio.wait_for(in_daemon_thread(named_actors), self.cfg.ray.call_timeout_s)
        except Exception:  # noqa: BLE001 - a cluster that is gone fails in many ways
            return False
        return True


def _print_report(event: str, fields: dict[str, Any]) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _run(cfg: Config) -> int:
    actors = StackActors(cfg, _print_report)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for group in stack_specs(cfg):
            await actors.ensure(group)
        actors.supervise()
        await stop.wait()
        return 0
    except StartFailed as exc:
        _print_report("failed", {"reason": exc.message})
        return 1
    finally:
        await actors.aclose()


async def _status(cfg: Config) -> int:
    import ray

    names = sorted(await in_daemon_thread(named_actors))
    pids = {}
    for name in names:
        handle = ray.get_actor(name, namespace=cfg.ray.namespace)
        pids[name] = await asyncio.wait_for(handle.pid.remote(), cfg.ray.call_timeout_s)
    _print_report("status", {"namespace": cfg.ray.namespace, "actors": pids})
    return 0


def _kill(cfg: Config) -> int:
    import ray

    names = sorted(n for n in named_actors() if n.startswith("switchyard-"))
    for name in names:
        ray.kill(ray.get_actor(name, namespace=cfg.ray.namespace))
    _print_report("killed", {"namespace": cfg.ray.namespace, "actors": names})
    return 0


def main(argv: list[str] | None = None) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m deploy.stack_actors",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML file, or JSON written by `up`")
    parser.add_argument("command", choices=("run", "status", "kill"))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, os.environ)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    init_ray(cfg.ray)
    if args.command == "kill":
        return _kill(cfg)
    return uvloop.run(_run(cfg) if args.command == "run" else _status(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
