"""Redis connections and the replica registry. Tenants, API keys and prices
are the control plane's (actors/control_plane.py)."""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from scheduler.config import RedisConfig
from scheduler.wire import REGISTRY_KEY, REMOVED_KEY, ReplicaInfo, encode, replica_decoder


def connect_redis(cfg: RedisConfig) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        cfg.url, socket_timeout=cfg.timeout_s, socket_connect_timeout=cfg.timeout_s,
        decode_responses=True)


class ReplicaRegistry:
    """Replica id -> ReplicaInfo, read by scheduler actors, written by `up`,
    `switchyard replicas` and the replica agents. Ids an operator removed are
    remembered, so an agent does not bring its replica back."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def put_replica(self, info: ReplicaInfo) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(REMOVED_KEY, info.id)
            pipe.hset(REGISTRY_KEY, info.id, encode(info).decode())
            await pipe.execute()

    async def register_if_absent(self, info: ReplicaInfo) -> bool:
        """Adds the entry unless one exists; True when it was added."""
        return bool(await self.redis.hsetnx(REGISTRY_KEY, info.id, encode(info).decode()))

    async def replica(self, replica_id: str) -> ReplicaInfo | None:
        raw = await self.redis.hget(REGISTRY_KEY, replica_id)
        return None if raw is None else replica_decoder.decode(raw)

    async def set_draining(self, replica_id: str, draining: bool) -> bool:
        """False when there is no such replica."""
        info = await self.replica(replica_id)
        if info is None:
            return False
        await self.redis.hset(REGISTRY_KEY, replica_id, encode(
            msgspec.structs.replace(info, draining=draining)).decode())
        return True

    async def retire_replica(self, replica_id: str) -> bool:
        """An operator's removal: the entry goes and its agent stops re-adding it."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(REMOVED_KEY, replica_id)
            pipe.hdel(REGISTRY_KEY, replica_id)
            _, removed = await pipe.execute()
        return bool(removed)

    async def is_removed(self, replica_id: str) -> bool:
        return bool(await self.redis.sismember(REMOVED_KEY, replica_id))

    async def remove_replica(self, replica_id: str) -> None:
        await self.redis.hdel(REGISTRY_KEY, replica_id)

    async def replicas(self) -> list[ReplicaInfo]:
        raw = await self.redis.hgetall(REGISTRY_KEY)
        return sorted((replica_decoder.decode(v) for v in raw.values()), key=lambda r: r.id)
