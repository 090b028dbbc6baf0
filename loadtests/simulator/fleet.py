"""Several simulated replicas in one process, each on its own port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import web

from loadtests.simulator.replica import SimReplica
from loadtests.simulator.server import create_app
from scheduler.config import SimulatorConfig

# In-flight streams are simulated, so nothing is lost by cutting them short.
SHUTDOWN_TIMEOUT_S = 0.5
# SO_LINGER on with a zero timeout: close() sends RST, as a dying process's sockets do.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class ReplicaServer:
    """One replica's listening socket and app; it can stop listening for a while or crash."""

    def __init__(self, replica: SimReplica, host: str, port: int) -> None:
        self.replica = replica
        self.host = host
        self.port = port
        self.crashed = asyncio.Event()
        self._runner = web.AppRunner(
            create_app(replica, control=self),
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            access_log=None,
        )
        self._server: asyncio.Server | None = None
        self._relisten: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        try:
            await self._listen()
        except BaseException:
            await self._runner.cleanup()
            raise

    async def aclose(self) -> None:
        """Stops listening and cancels in-flight requests (recorded as aborted)."""
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
        self._stop_listening()
        await self._runner.cleanup()

    def refuse_for(self, seconds: float) -> None:
        if self._relisten is not None and not self._relisten.done():
            self._relisten.cancel()
        self._stop_listening()
        self._relisten = asyncio.create_task(self._listen_after(seconds),
                                             name=f"sim-relisten-{self.port}")

    async def crash(self, spare: asyncio.BaseTransport | None) -> None:
        """Stops listening, resets every connection but `spare`, and stops the replica."""
        if self._relisten is not None:
            self._relisten.cancel()
        self._stop_listening()
        server = self._runner.server
        for handler in list(server.connections if server is not None else ()):
            transport = handler.transport
            if transport is None or transport is spare:
                continue
            with contextlib.suppress(OSError):
                transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            transport.abort()
        if spare is not None:
            spare.close()
        await self.replica.aclose()
        self.crashed.set()

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen()

    async def _listen(self) -> None:
        # Binding the socket ourselves reports a busy port before anything
        # starts, tells us the real port when 0 was asked for, and lets a
        # refuse fault listen again on the same port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.setblocking(False)
            assert self._runner.server is not None
            self._server = await asyncio.get_running_loop().create_server(
                self._runner.server, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class SimFleet:
    """Running replicas with their URLs, index for index."""

    def __init__(self, servers: list[ReplicaServer]) -> None:
        self.servers = servers

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def replicas(self) -> list[SimReplica]:
        return [server.replica for server in self.servers]

    async def wait_all_crashed(self) -> None:
        for server in self.servers:
            await server.crashed.wait()

    async def aclose(self) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            await server.aclose()


async def start_fleet(
    cfg: SimulatorConfig, host: str = "127.0.0.1", ports: list[int] | None = None
) -> SimFleet:
    """Starts cfg.replicas replicas; ports default to base_port + i, and 0 picks a free port."""
    if ports is None:
        ports = [cfg.base_port + index for index in range(cfg.replicas)]
    if len(ports) != cfg.replicas:
        raise ValueError(f"{cfg.replicas} replicas need {cfg.replicas} ports, got {len(ports)}")
    fleet = SimFleet([])
    try:
        for index, port in enumerate(ports):
            # Replicas share the seed: a request gets the same answer on any of
            # them, so a retry elsewhere is indistinguishable from the first try.
            server = ReplicaServer(SimReplica(cfg, index=index), host, port)
            await server.start()
            fleet.servers.append(server)
    except BaseException:
        await fleet.aclose()
        raise
    return fleet
