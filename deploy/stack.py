"""`switchyard up`: the whole stack on this machine, on 127.0.0.1.

Order: nats-server, redis-server, the replicas with their agents (simulated
unless URLs are given; deploy/replica_fleet.py), the replica registry, Ray
actors (metering, schedulers, quota shards; deploy/stack_actors.py, which
also keeps them alive), the ingress. Each part is awaited until ready;
a part that fails is named with its reason. Stopping (SIGINT/SIGTERM, or any
child dying) ends every part, the ingress first.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import msgspec

from actors.control_plane import ControlPlane, tenant_with_key
from actors.control_store import ReplicaRegistry, connect_redis
from deploy.procs import ChildProcess, StartFailed, python_module, start_nats, start_redis
from deploy.replica_fleet import ReplicaFleet, healthy
from deploy.stack_actors import StackActors, stack_specs
from deploy.tiny_model import TINY_MODEL_DIR
from scheduler.config import Config, ModelConfig, dump_config
from scheduler.control import SYSTEM
from scheduler.tenancy import Price

DEMO_TENANT = "demo"
# What `up` charges for a served model that has no price (USD 0.15 / 0.075 /
# 0.60 per million input / cached input / output tokens): an unpriced model
# is refused for every tenant, so it could not be served at all.
DEMO_PRICE = Price(effective_from_s=0, input_nusd_per_token=150,
                   cached_input_nusd_per_token=75, output_nusd_per_token=600)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise StartFailed(f"no port in {url}")
    return port


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths, a key secret kept under var/ when none is set (Ray
    workers and child processes do not share our working directory), and the
    simulated model's settings (see with_simulated_model)."""
    var = Path(cfg.var_dir).resolve()
    var.mkdir(parents=True, exist_ok=True)
    secret = cfg.auth.key_secret or _stored_secret(var / "key_secret")
    models = {name: msgspec.structs.replace(
        m, tokenizer_dir=str(Path(m.tokenizer_dir).resolve()) if m.tokenizer_dir else "")
        for name, m in cfg.models.items()}
    return with_simulated_model(msgspec.structs.replace(
        cfg, var_dir=str(var), auth=msgspec.structs.replace(cfg.auth, key_secret=secret),
        models=models))


def with_simulated_model(cfg: Config) -> Config:
    """When `up` simulates the replicas (no static ones) and the config says
    nothing of their model, the model is what the simulator stands in for:
    its tokenizer, block size, hash algorithm and seed, so precise prefix
    routing works out of the box."""
    sim = cfg.simulator
    if cfg.replicas or sim.model in cfg.models:
        return cfg
    model = ModelConfig(tokenizer_dir=str(Path(sim.tokenizer_dir or TINY_MODEL_DIR).resolve()),
                        block_size_tokens=sim.block_size_tokens,
                        prefix_caching_hash_algo=sim.prefix_caching_hash_algo,
                        python_hash_seed=sim.python_hash_seed)
    return msgspec.structs.replace(cfg, models={**cfg.models, sim.model: model})


async def price_unpriced(plane: ControlPlane, models: Iterable[str]) -> list[str]:
    """Gives each of `models` that has no price DEMO_PRICE (audited, as any
    price), in force once this returns; the models priced."""
    unpriced = sorted(set(models) - (await plane.prices(SYSTEM)).keys())
    # A price starts now or later: the next second, waited for.
    from_s = int(time.time()) + 1
    for model in unpriced:
        await plane.set_price(SYSTEM, "sys-" + secrets.token_hex(8), model,
                              msgspec.structs.replace(DEMO_PRICE, effective_from_s=from_s))
    if unpriced:
        await asyncio.sleep(max(0.0, from_s - time.time()))
    return unpriced


def _stored_secret(path: Path) -> str:
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


class Stack:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.var = Path(cfg.var_dir)
        self.logs = self.var / "logs"
        self.children: list[ChildProcess] = []
        # The replica agents too: one supervisor keeps every actor alive.
        self.actors = StackActors(cfg)
        self.fleet = ReplicaFleet(cfg, self.var, self.logs, self.actors)
        self.started = False

    async def start(self) -> str:
        """Starts every part; returns the demo API key."""
        nats_proc, _ = await start_nats(self.var / "nats", self.logs, port_of(self.cfg.nats.url))
        self.children.append(nats_proc)
        redis_proc, _ = await start_redis(self.var / "redis", self.logs,
                                          port_of(self.cfg.redis.url))
        self.children.append(redis_proc)
        redis = connect_redis(self.cfg.redis)
        try:
            registry = ReplicaRegistry(redis)
            # `up` owns the registry: replicas of an earlier run are dropped.
            for stale in await registry.replicas():
                await registry.remove_replica(stale.id)
            infos = await self.fleet.start()
            for info in infos:
                await registry.put_replica(info)
            await price_unpriced(ControlPlane(redis, self.cfg.auth, None),
                                 (m for info in infos for m in info.models))
            await self._start_actors()
            await self._start_ingress()
            if self.cfg.admin.enabled:
                await self._start_admin()
            _, issued = await tenant_with_key(ControlPlane(redis, self.cfg.auth, None),
                                              DEMO_TENANT)
        finally:
            await redis.aclose()
        self.started = True
        return issued.plaintext

    async def _start_actors(self) -> None:
        for group in stack_specs(self.cfg):
            await self.actors.ensure(group)
        self.actors.supervise()

    async def _start_ingress(self) -> None:
        config_path = self.var / "run" / "config.json"
        self._write_config(config_path)
        proc = ChildProcess("ingress", python_module("router", "--config", str(config_path)),
                            self.logs / "ingress.log")
        await proc.start()
        self.children.append(proc)
        url = f"http://127.0.0.1:{self.cfg.ingress.port}/readyz"
        async with aiohttp.ClientSession() as session:
            await proc.wait_ready(lambda: healthy(session, url), timeout_s=30)

    async def _start_admin(self) -> None:
        """Its own process, beside the ingress (however many workers that has)."""
        proc = ChildProcess("admin", python_module("router.admin_main", "--config",
                                                   str(self.var / "run" / "config.json")),
                            self.logs / "admin.log")
        await proc.start()
        self.children.append(proc)
        url = f"http://127.0.0.1:{self.cfg.admin.port}/healthz"
        async with aiohttp.ClientSession() as session:
            await proc.wait_ready(lambda: healthy(session, url), timeout_s=30)

    def _write_config(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dump_config(self.cfg))
        path.chmod(0o600)  # it holds the key secret

    async def wait_for_exit(self, stop: asyncio.Event) -> None:
        """Blocks until `stop` is set or a child dies (which it reports)."""
        while not stop.is_set():
            for child in self.children + self.fleet.children:
                if child.exited():
                    raise StartFailed(f"{child.name} exited unexpectedly (log {child.log_path})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    async def stop(self) -> None:
        """Ingress first (no new work), then actors, replicas, Redis, NATS."""
        ingress, servers = self.children[2:], self.children[:2]
        for child in reversed(ingress):
            await child.stop()
        await self.actors.aclose()
        await self.fleet.stop()
        for child in reversed(servers):
            await child.stop()


def print_line(text: str) -> None:
    # stdout may be a pipe whose reader is gone (Ctrl-C also ends `| tee`);
    # losing a status line must never stop the shutdown.
    with contextlib.suppress(OSError):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


async def run_stack(cfg: Config) -> int:
    """Runs the stack until SIGINT/SIGTERM; a signal during start-up cancels
    the start and still stops whatever was already running."""
    stack = Stack(cfg)
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            return  # already stopping: let the stop finish
        stop.set()
        if not stack.started:
            main.cancel()
        print_line(f"switchyard: {name}, stopping")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        key = await stack.start()
        api = f"http://{cfg.ingress.host}:{cfg.ingress.port}/v1"
        admin = (f"  admin http://{cfg.admin.host}:{cfg.admin.port}/admin/v1"
                 if cfg.admin.enabled else "")
        print_line(f"switchyard is up: API {api}  demo key {key}{admin}  "
                   "(Ctrl-C stops everything)")
        await stack.wait_for_exit(stop)
        return 0
    except StartFailed as exc:
        print_line(f"switchyard: {exc.message}")
        return 1
    except asyncio.CancelledError:
        return 130
    finally:
        await stack.stop()
        print_line("switchyard: stopped")
