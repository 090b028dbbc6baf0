"""The path of one request, shared by the HTTP and NATS front ends:
authenticate, validate, place (NATS round trip to a scheduler actor), call
the replica, and at the end hand usage and a completion notice to the outbox."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS

from router.auth import Authenticator, Principal
from router.metrics import Metrics
from router.outbox import Outbox
from router.prompt_blocks import PromptHasher
from router.requests import ParsedRequest, parse_request
from router.upstream import ReplicaClient, UpstreamCall
from scheduler.approx_index import chunk_hashes
from scheduler.config import Config
from scheduler.errors import PLACEMENT_ERRORS, BodyTooLarge, NoCapacity, YardError
from scheduler.wire import (
    MODELS_SUBJECT,
    ModelCard,
    ModelsQuery,
    PlaceDone,
    Placement,
    PlaceRequest,
    UsageEvent,
    encode,
    models_reply_decoder,
    place_reply_decoder,
    place_subject,
)

# Requests of one conversation share it (or the OpenAI `user` field), for
# the session-affinity scorer.
SESSION_HEADER = "x-session-id"
# The scorers that read a request's block hashes; without them (a model with
# no tokenizer) they read its chunk hashes.
BLOCK_HASH_SCORERS = frozenset({"prefix-precise", "cost"})
# The scorers that read chunk hashes in any case.
CHUNK_HASH_SCORERS = frozenset({"prefix-approx"})


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


@dataclass(slots=True)
class RequestContext:
    request_id: str
    principal: Principal
    parsed: ParsedRequest
    placement: Placement
    started_at_s: float
    started_at_ms: int


class Gateway:
    def __init__(self, cfg: Config, auth: Authenticator, nc: NATS, replicas: ReplicaClient,
                 outbox: Outbox, metrics: Metrics, hasher: PromptHasher) -> None:
        self.cfg = cfg
        self._auth = auth
        self._nc = nc
        self._replicas = replicas
        self._outbox = outbox
        self._metrics = metrics
        sched = cfg.scheduler
        scorers = {s.name for s in sched.profiles[sched.profile].scorers}
        # Both kinds of hash cost time per prompt byte: only when a scorer reads them.
        self._chunking = bool(scorers & CHUNK_HASH_SCORERS)
        self._hasher = hasher if scorers & BLOCK_HASH_SCORERS else None

    async def authenticate(self, authorization: str | None) -> Principal:
        return await self._auth.authenticate(authorization)

    async def admit(self, request_id: str, route: str, body: bytes,
                    authorization: str | None, session_id: str | None = None) -> RequestContext:
        started_at_s = time.monotonic()
        principal = await self._auth.authenticate(authorization)
        if len(body) > self.cfg.ingress.max_body_bytes:
            raise BodyTooLarge(f"Request body exceeds {self.cfg.ingress.max_body_bytes} bytes.")
        parsed = parse_request(route, body)
        placement = await self._place(request_id, principal, parsed,
                                      session_id or parsed.user)
        return RequestContext(request_id, principal, parsed, placement, started_at_s,
                              int(time.time() * 1000))

    def call(self, ctx: RequestContext) -> UpstreamCall:
        return self._replicas.call(ctx.placement.url, ctx.parsed.route,
                                   ctx.parsed.upstream_body, ctx.request_id,
                                   ctx.placement.replica_id)

    def finish(self, ctx: RequestContext, call: UpstreamCall, status: int,
               error_code: str = "") -> None:
        """Records the outcome. Synchronous and non-blocking, so it can run
        in the `finally` of a handler cancelled by a client disconnect."""
        now_s = time.monotonic()
        record = call.record
        usage = record.usage
        ttft_s = (record.first_byte_at_s - ctx.started_at_s) if record.first_byte_at_s else 0.0
        if record.first_byte_at_s:
            self._metrics.ttft.labels(ctx.parsed.route).observe(ttft_s)
        if status >= 500:
            self._metrics.upstream_errors.labels(ctx.placement.replica_id).inc()
        event = UsageEvent(
            request_id=ctx.request_id, tenant_id=ctx.principal.tenant_id,
            key_id=ctx.principal.key_id, model=ctx.parsed.model,
            replica_id=ctx.placement.replica_id, route=ctx.parsed.route,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            # Without the final usage chunk (client gone), each content chunk
            # is one generated token as vLLM streams them.
            completion_tokens=usage.completion_tokens if usage else record.content_chunks,
            ttft_ms=ttft_s * 1000, latency_ms=(now_s - ctx.started_at_s) * 1000,
            status=status, error_code=error_code, started_at_ms=ctx.started_at_ms)
        done = PlaceDone(request_id=ctx.request_id, replica_id=ctx.placement.replica_id,
                         model=ctx.parsed.model)
        self._outbox.request_done(done, event)

    async def models(self) -> tuple[ModelCard, ...]:
        reply = await self._request(MODELS_SUBJECT, encode(ModelsQuery()))
        return models_reply_decoder.decode(reply).models

    async def _place(self, request_id: str, principal: Principal, parsed: ParsedRequest,
                     session_id: str) -> Placement:
        blocks = await self._hasher.block_hashes(parsed) if self._hasher else None
        chunks = (self._chunk_hashes(parsed) if self._chunking
                  or (self._hasher is not None and blocks is None) else ())
        req = PlaceRequest(request_id=request_id, tenant_id=principal.tenant_id,
                           model=parsed.model, prompt_tokens=parsed.prompt_tokens_est,
                           max_tokens=parsed.max_tokens or self.cfg.ingress.default_max_tokens,
                           block_hashes=blocks or (), chunk_hashes=chunks,
                           session_id=session_id)
        started_s = time.perf_counter()
        try:
            reply = await self._request(place_subject(parsed.model), encode(req))
        except BaseException:
            # The scheduler may have counted it before the answer was lost (or
            # the client left): release it, or it pins the load until its TTL.
            self._outbox.placement_done(PlaceDone(request_id=request_id, replica_id="",
                                                  model=parsed.model))
            raise
        self._metrics.placement.observe(time.perf_counter() - started_s)
        decision = place_reply_decoder.decode(reply)
        if isinstance(decision, Placement):
            return decision
        error_type: type[YardError] = PLACEMENT_ERRORS.get(decision.code, NoCapacity)
        raise error_type(decision.message, param="model" if decision.code == "model_not_found"
                         else None, retry_after_s=decision.retry_after_s)

    def _chunk_hashes(self, parsed: ParsedRequest) -> tuple[int, ...]:
        params = self.cfg.scheduler.plugins.prefix_approx
        return chunk_hashes(parsed.prompt_bytes, params.chunk_bytes, params.max_chunks)

    async def _request(self, subject: str, payload: bytes) -> bytes:
        try:
            msg = await self._nc.request(subject, payload,
                                         timeout=self.cfg.ingress.placement_timeout_s)
        except nats.errors.NoRespondersError:
            self._metrics.nats_errors.inc()
            raise NoCapacity("No scheduler is serving placements right now.",
                             retry_after_s=1.0) from None
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.Error) as exc:
            self._metrics.nats_errors.inc()
            raise NoCapacity(f"Placement failed: {type(exc).__name__}.",
                             retry_after_s=1.0) from None
        return msg.data

