"""Several simulated replicas in one process, each on its own port."""

from __future__ import annotations

import socket

from aiohttp import web

from loadtests.simulator.replica import SimReplica
from loadtests.simulator.server import create_app
from scheduler.config import SimulatorConfig

# In-flight streams are simulated, so nothing is lost by cutting them short.
SHUTDOWN_TIMEOUT_S = 0.5


class SimFleet:
    """Running replicas with their URLs, index for index."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.replicas: list[SimReplica] = []
        self._runners: list[web.AppRunner] = []

    def _add(self, replica: SimReplica, runner: web.AppRunner, url: str) -> None:
        self.replicas.append(replica)
        self._runners.append(runner)
        self.urls.append(url)

    async def aclose(self) -> None:
        """Stops listening and cancels in-flight requests (recorded as aborted)."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


async def start_fleet(
    cfg: SimulatorConfig, host: str = "127.0.0.1", ports: list[int] | None = None
) -> SimFleet:
    """Starts cfg.replicas replicas; ports default to base_port + i, and 0 picks a free port."""
    if ports is None:
        ports = [cfg.base_port + index for index in range(cfg.replicas)]
    if len(ports) != cfg.replicas:
        raise ValueError(f"{cfg.replicas} replicas need {cfg.replicas} ports, got {len(ports)}")
    fleet = SimFleet()
    try:
        for port in ports:
            # Replicas share the seed: a request gets the same answer on any of
            # them, so a retry elsewhere is indistinguishable from the first try.
            replica = SimReplica(cfg)
            runner, bound_port = await _serve(replica, host, port)
            fleet._add(replica, runner, f"http://{host}:{bound_port}")
    except BaseException:
        await fleet.aclose()
        raise
    return fleet


async def _serve(replica: SimReplica, host: str, port: int) -> tuple[web.AppRunner, int]:
    # Binding the socket ourselves reports a busy port before anything starts
    # and tells us the real port when 0 was asked for.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    runner = web.AppRunner(
        create_app(replica),
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        access_log=None,
    )
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, bound_port
