"""Thin Ray actors hosting the asyncio services. Each starts its service on
the actor's own event loop when created, and again after a Ray restart."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import ray

from actors.scheduler import SchedulerService
from analytics.metering import MeteringService
from scheduler.config import config_from_json


class Service(Protocol):
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class _Host:
    def __init__(self, service: Service) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self._service = service
        # Ray runs an async actor's __init__ on the actor's running loop.
        self._started = asyncio.get_running_loop().create_task(service.start())

    async def ready(self) -> bool:
        """Returns once the service is serving; raises why it could not start."""
        await asyncio.shield(self._started)
        return True

    async def stats(self) -> dict[str, Any]:
        return self._service.stats()

    async def stop(self) -> None:
        await self._service.aclose()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor(_Host):
    def __init__(self, config_json: bytes) -> None:
        super().__init__(SchedulerService(config_from_json(config_json)))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MeteringActor(_Host):
    def __init__(self, config_json: bytes) -> None:
        super().__init__(MeteringService(config_from_json(config_json)))
