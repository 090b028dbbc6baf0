"""Where a quota shard keeps its ledgers: one Redis hash per tenant
(`<quota.redis_prefix><tenant id>`) in the Redis of `quota.redis_url` (or of
`[redis]`). Every call is bounded by `quota.store_timeout_s`, so a Redis that
accepts connections and never answers (SIGSTOPped) costs a call that long,
not a hang.

A Redis can come back empty (restarted without persistence, or a failover to
a replica that had nothing): the shard's epoch key (`<prefix>~epoch:<shard>`),
set when the shard starts, is read in every write's transaction; once it is
gone the store is `lost`, and the shard must write every ledger it holds in
full (its memory is then the only copy) before it answers again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping

import redis.asyncio as aioredis
import redis.exceptions

from scheduler.config import RedisConfig
from scheduler.quota_terms import QuotaConfig


class StoreUnavailable(Exception):
    """The Redis failed, or did not answer within `quota.store_timeout_s`."""


class StoreLost(StoreUnavailable):
    """The Redis no longer holds what this shard wrote to it."""


class QuotaStore:
    def __init__(self, quota: QuotaConfig, redis_cfg: RedisConfig, shard: int) -> None:
        self.redis = aioredis.Redis.from_url(
            quota.redis_url or redis_cfg.url, socket_timeout=quota.store_timeout_s,
            socket_connect_timeout=quota.store_timeout_s, decode_responses=True)
        self.prefix = quota.redis_prefix
        self.timeout_s = quota.store_timeout_s
        self._epoch_key = f"{quota.redis_prefix}~epoch:{shard}"
        self._epoch = uuid.uuid4().hex

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def claim_epoch(self) -> bool:
        """Sets the epoch key unless it is there; True if it was not (a new
        or emptied Redis)."""
        async with self._bounded():
            return bool(await self.redis.set(self._epoch_key, self._epoch, nx=True))

    async def is_lost(self) -> bool:
        async with self._bounded():
            return await self.redis.get(self._epoch_key) is None

    async def load(self, tenant_id: str) -> Mapping[str, str]:
        """The tenant's hash; raises StoreLost if the epoch key is gone (an
        empty hash would not tell a new tenant from a lost one)."""
        async with self._bounded():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._epoch_key)
                pipe.hgetall(self.prefix + tenant_id)
                epoch, fields = await pipe.execute()
        if epoch is None:
            raise StoreLost(self._epoch_key)
        return fields

    async def write(self, tenant_id: str, changes: Mapping[str, bytes | None]) -> None:
        """The changed fields (None: deleted), in one transaction that also
        checks the epoch key; raises StoreLost once it is gone."""
        key = self.prefix + tenant_id
        puts = {field: value for field, value in changes.items() if value is not None}
        gone = [field for field, value in changes.items() if value is None]
        async with self._bounded():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._epoch_key)
                if puts:
                    pipe.hset(key, mapping=puts)  # type: ignore[arg-type]
                if gone:
                    pipe.hdel(key, *gone)
                epoch, *_ = await pipe.execute()
        if epoch is None:
            raise StoreLost(self._epoch_key)

    async def rewrite(self, tenant_id: str, fields: Mapping[str, bytes]) -> None:
        """The whole ledger, replacing whatever the hash holds."""
        key = self.prefix + tenant_id
        async with self._bounded():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                await pipe.execute()

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(repr(exc)) from exc
