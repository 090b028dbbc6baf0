"""The control store in Redis: tenants, hashed API keys, the replica registry.

Plaintext keys never reach Redis: only the HMAC digest and a 4-character hint.
"""

from __future__ import annotations

import secrets
import time

import msgspec
import redis.asyncio as aioredis

from scheduler import apikeys
from scheduler.config import RedisConfig
from scheduler.priority import DEFAULT_PRIORITY, PriorityRange
from scheduler.wire import REGISTRY_KEY, REMOVED_KEY, ReplicaInfo, encode, replica_decoder

TENANT_KEY = "sy:tenant:{tenant_id}"
TENANT_BY_NAME_KEY = "sy:tenant-by-name"
API_KEY_KEY = "sy:apikey:{key_id}"


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    tenant_id: str
    digest: str
    hint: str
    status: str = "active"
    # The tenant's, read with the key (and cached with it by the ingress).
    priority: PriorityRange = DEFAULT_PRIORITY


# Tenant hash fields of its PriorityRange; a tenant stored without them gets the defaults.
PRIORITY_FIELDS = ("priority_default", "priority_lowest", "priority_highest")


def connect_redis(cfg: RedisConfig) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        cfg.url, socket_timeout=cfg.timeout_s, socket_connect_timeout=cfg.timeout_s,
        decode_responses=True)


class TenantStore:
    """Tenants and their API keys."""

    def __init__(self, redis: aioredis.Redis, server_secret: bytes) -> None:
        self.redis = redis
        self.server_secret = server_secret

    async def ensure_tenant(self, name: str,
                            priority: PriorityRange = DEFAULT_PRIORITY) -> str:
        """Returns the id of the tenant called `name`, creating it if needed
        (an existing tenant keeps its priority range)."""
        tenant_id = "t-" + secrets.token_hex(6)
        created = await self.redis.hsetnx(TENANT_BY_NAME_KEY, name, tenant_id)
        if not created:
            return await self.redis.hget(TENANT_BY_NAME_KEY, name)
        await self.redis.hset(TENANT_KEY.format(tenant_id=tenant_id), mapping={
            "name": name, "status": "active", "created_at_s": str(int(time.time())),
            **_priority_fields(priority)})
        return tenant_id

    async def set_priority(self, tenant_id: str, priority: PriorityRange) -> None:
        """Reaches every ingress once its cached key records expire (key_cache_ttl_s)."""
        await self.redis.hset(TENANT_KEY.format(tenant_id=tenant_id),
                              mapping=_priority_fields(priority))

    async def create_key(self, tenant_id: str) -> apikeys.IssuedKey:
        """Issues a key; the plaintext is returned here once and stored nowhere."""
        issued = apikeys.issue(self.server_secret)
        await self.redis.hset(API_KEY_KEY.format(key_id=issued.key_id), mapping={
            "tenant_id": tenant_id, "digest": issued.digest, "hint": issued.hint,
            "status": "active", "created_at_s": str(int(time.time()))})
        return issued

    async def key_record(self, key_id: str) -> KeyRecord | None:
        fields = await self.redis.hgetall(API_KEY_KEY.format(key_id=key_id))
        if not fields:
            return None
        stored = await self.redis.hmget(TENANT_KEY.format(tenant_id=fields["tenant_id"]),
                                        PRIORITY_FIELDS)
        priority = DEFAULT_PRIORITY if None in stored else PriorityRange(
            **dict(zip(("default", "lowest", "highest"), map(int, stored), strict=True)))
        return KeyRecord(key_id=key_id, tenant_id=fields["tenant_id"],
                         digest=fields["digest"], hint=fields.get("hint", ""),
                         status=fields.get("status", "active"), priority=priority)


def _priority_fields(priority: PriorityRange) -> dict[str, str]:
    return dict(zip(PRIORITY_FIELDS, map(str, (priority.default, priority.lowest,
                                                priority.highest)), strict=True))


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
