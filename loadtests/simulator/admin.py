"""The simulator's own routes under /sim/: ground truth per request and faults.

- GET /sim/requests: the ids of the recorded requests, oldest first.
- GET /sim/requests/{id}: what that request really cost (ledger.RequestRecord).
- GET /sim/faults: the faults in force; POST /sim/faults sets them (faults.py).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec
from aiohttp import web

from loadtests.simulator.faults import FaultSpecError, decode_faults
from loadtests.simulator.protocol import SimApiError
from loadtests.simulator.replica import SimReplica


class ServerControl(Protocol):
    """The listening side of a replica, which the crash and refuse faults act on."""

    def refuse_for(self, seconds: float) -> None: ...

    async def crash(self, spare: asyncio.BaseTransport | None) -> None: ...


REPLICA_KEY = web.AppKey("replica", SimReplica)
CONTROL_KEY = web.AppKey("control", ServerControl)

_encode_json = msgspec.json.Encoder().encode


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/sim/requests", _sim_requests)
    app.router.add_get("/sim/requests/{request_id}", _sim_request)
    app.router.add_get("/sim/faults", _get_faults)
    app.router.add_post("/sim/faults", _post_faults)


def _json(body: object) -> web.Response:
    return web.Response(body=_encode_json(body), content_type="application/json")


async def _sim_requests(request: web.Request) -> web.Response:
    return _json({"request_ids": request.app[REPLICA_KEY].ledger.request_ids()})


async def _sim_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    record = request.app[REPLICA_KEY].ledger.get(request_id)
    if record is None:
        raise SimApiError(f"Unknown request `{request_id}`", status=404, err_type="NotFoundError")
    return _json(record)


async def _get_faults(request: web.Request) -> web.Response:
    return _json(request.app[REPLICA_KEY].faults)


async def _post_faults(request: web.Request) -> web.StreamResponse:
    try:
        faults = decode_faults(await request.read())
    except FaultSpecError as exc:
        raise SimApiError(str(exc)) from None
    control = request.app.get(CONTROL_KEY)
    acts_on_socket = faults.crash or faults.refuse_connections_s > 0
    if acts_on_socket and control is None:
        raise SimApiError("crash and refuse_connections_s need a replica served by a fleet",
                          status=501, err_type="NotImplementedError")
    request.app[REPLICA_KEY].set_faults(faults)
    response = _json(faults)
    if control is None or not acts_on_socket:
        return response
    # Answer first: the fault may take this very connection down.
    await response.prepare(request)
    await response.write_eof()
    if faults.crash:
        await control.crash(spare=request.transport)
    else:
        control.refuse_for(faults.refuse_connections_s)
    return response
