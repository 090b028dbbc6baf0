"""The path of one request, shared by the HTTP and NATS front ends:
authenticate, validate, refuse an unpriced model, admit against the
tenant's quota, place (NATS round trip to a scheduler actor, or on this
ingress when none can be asked: router/fallback.py), call
the replica (retried on another one while the client has no byte yet), and
at the end hand usage and a completion notice to the outbox and settle the
quota."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from router.auth import Authenticator, Principal
from router.fallback import FallbackPlacer
from router.metrics import Metrics
from router.outbox import Outbox
from router.placer import Placer
from router.prices import PriceBook
from router.prompt_blocks import PromptHasher
from router.quota_client import Admission, QuotaClient
from router.requests import ChatBody, ParsedRequest, parse_request
from router.upstream import ReplicaClient, UpstreamCall
from scheduler.approx_index import chunk_hashes
from scheduler.config import Config, model_config
from scheduler.errors import (
    PLACEMENT_ERRORS,
    BodyTooLarge,
    ModelNotFound,
    NoCapacity,
    SchedulerUnreachable,
    UpstreamFailed,
    UsageSpoolFull,
    YardError,
)
from scheduler.retry_budget import RetryBudget
from scheduler.tenancy import TenantLimits
from scheduler.usage_clamp import Reported, clamp_usage, prompt_tokens_bound
from scheduler.wire import (
    MODELS_SUBJECT,
    REPLICA_FAILED_SUBJECT,
    ModelCard,
    ModelsQuery,
    PlaceDone,
    Placement,
    PlaceRejected,
    PlaceRequest,
    ReplicaFailed,
    UsageEvent,
    encode,
    models_reply_decoder,
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
SPOOL_FULL_RETRY_AFTER_S = 5.0


def _profile_scorers(cfg: Config) -> set[str]:
    return {s.name for s in cfg.scheduler.profiles[cfg.scheduler.profile].scorers}


def reads_block_hashes(cfg: Config) -> bool:
    """Whether the active profile reads block hashes (so prompts are tokenized)."""
    return bool(_profile_scorers(cfg) & BLOCK_HASH_SCORERS)


def enforces_limits(limits: TenantLimits) -> bool:
    """Whether a tenant's quota shard has anything to enforce (max_tokens_cap
    is applied by the ingress itself)."""
    return bool(limits.requests_per_minute or limits.tokens_per_minute
                or limits.max_concurrent_requests or limits.budget_nusd)


def new_request_id() -> str:
    # 128 random bits, as uuid4's hex (which costs several times more).
    return "req-" + os.urandom(16).hex()


@dataclass(slots=True)
class RequestContext:
    request_id: str
    principal: Principal
    parsed: ParsedRequest
    # What the scheduler was asked (routing features computed once; a retry
    # asks again with the failed replicas excluded).
    place_req: PlaceRequest
    placement: Placement
    # The call to the placed replica (the current attempt's).
    call: UpstreamCall
    started_at_s: float
    started_at_ms: int
    # Settled (or released) once, when the request ends; None: admitted
    # without the tenant's shard (no limits, NATS down), nothing to settle.
    admission: Admission | None
    # Some attempt was placed by this ingress (released here when it ends).
    placed_locally: bool = False
    # Time spent waiting for the replicas of failed attempts (the current
    # attempt's is in call.record), left out of switchyard's overhead.
    upstream_wait_s: float = 0.0


class Gateway:
    def __init__(self, cfg: Config, auth: Authenticator, nc: NATS, placer: Placer,
                 replicas: ReplicaClient, outbox: Outbox, metrics: Metrics,
                 hasher: PromptHasher | None, quota: QuotaClient, prices: PriceBook,
                 fallback: FallbackPlacer | None) -> None:
        """`fallback`: None when `ingress.fallback_placement` is off."""
        self.cfg = cfg
        self._quota = quota
        self._prices = prices
        self._fallback = fallback
        self._auth = auth
        self._nc = nc
        self._placer = placer
        self._replicas = replicas
        self._outbox = outbox
        self._metrics = metrics
        # Both kinds of hash cost time per prompt byte: only when a scorer reads them.
        self._chunking = bool(_profile_scorers(cfg) & CHUNK_HASH_SCORERS)
        self._hasher = hasher
        retries = cfg.retries
        self._budget = RetryBudget(retries.budget_ratio, retries.budget_min_retries,
                                   retries.budget_window_s)

    async def authenticate(self, authorization: str | None) -> Principal:
        return await self._auth.authenticate(authorization)

    async def admit(self, request_id: str, route: str, body: bytes,
                    authorization: str | None, session_id: str | None = None,
                    priority: str | None = None) -> RequestContext:
        """`priority`: the `x-priority` header, bounded by the tenant's range."""
        started_at_s = time.monotonic()
        principal = await self._auth.authenticate(authorization)
        tenant = principal.inference_tenant()
        if self._outbox.spool_full():
            # Every servable model is priced, so a request served now could
            # not be billed: fail closed until NATS takes the spool.
            raise UsageSpoolFull("Usage metering is unavailable; try again shortly.",
                                 retry_after_s=SPOOL_FULL_RETRY_AFTER_S)
        if len(body) > self.cfg.ingress.max_body_bytes:
            raise BodyTooLarge(f"Request body exceeds {self.cfg.ingress.max_body_bytes} bytes.")
        parsed = parse_request(route, body, tenant.cache_salt,
                               self.cfg.ingress.default_max_tokens,
                               tenant.limits.max_tokens_cap,
                               self.cfg.ingress.media_url_hosts)
        if not tenant.allows_model(parsed.model):
            # The scheduler's answer for a model nobody serves: whether it exists is not told.
            raise ModelNotFound(f"The model `{parsed.model}` does not exist.", param="model")
        # Before placement: a refused request never reaches a scheduler or a replica.
        await self._prices.require(parsed.model, tenant.tenant_id)
        admission = await self._admit_quota(tenant.tenant_id, tenant.limits, request_id,
                                            parsed)
        try:
            place_req = await self._place_request(request_id, principal, parsed,
                                                  session_id or parsed.user,
                                                  principal.priority.resolve(priority))
            placement, local = await self._place(place_req)
        except BaseException:
            # Not placed (refused, timed out, client gone): nothing was spent.
            if admission is not None:
                self._quota.release(admission)
            raise
        self._budget.note_request(started_at_s)
        return RequestContext(request_id, principal, parsed, place_req, placement,
                              self._call(parsed, request_id, placement),
                              started_at_s, int(time.time() * 1000), admission, local)

    async def _admit_quota(self, tenant_id: str, limits: TenantLimits, request_id: str,
                           parsed: ParsedRequest) -> Admission | None:
        """None: admitted without the shard. While NATS is down no shard can
        be asked; a tenant without limits has nothing to enforce there (its
        usage is billed from the spooled usage events all the same). Others
        go to the quota client, which admits rate-limited tenants from its
        local limit/N bucket while their shard is away and fails budgets closed."""
        if not self._nc.is_connected and not enforces_limits(limits):
            return None
        return await self._quota.admit(tenant_id, request_id, parsed.model,
                                       parsed.prompt_tokens_est, parsed.max_tokens or 0, limits)

    @contextlib.asynccontextmanager
    async def upstream(self, ctx: RequestContext) -> AsyncIterator[bytes]:
        """Calls the placed replica and yields the first piece of its answer:
        the whole body, or the stream's first payload (`ctx.call.rest()` has
        the others). Until then nothing reached the client, so a failed call
        (connect error, 5xx, stream dying) is retried on another replica,
        within `retries.max_attempts` and the retry budget; a 4xx is not."""
        while True:
            call = ctx.call
            try:
                await call.open()
                if ctx.parsed.stream:
                    first = await call.first_event(ctx.parsed.include_usage,
                                                   ctx.parsed.continuous_usage)
                else:
                    first = await call.read_body(ctx.parsed.assembled)
            except UpstreamFailed as exc:
                call.close(failed=True)
                if not await self._retry(ctx, exc):
                    raise
                continue
            except BaseException:
                call.close(failed=True)
                raise
            break
        try:
            yield first
        except BaseException:
            call.close(failed=True)
            raise
        call.close(failed=False)

    def finish(self, ctx: RequestContext, status: int, error_code: str = "") -> None:
        """Records the outcome of the attempt that reached the client (the
        only one metered). Synchronous and non-blocking, so it can run in
        the `finally` of a handler cancelled by a client disconnect."""
        now_s = time.monotonic()
        record = ctx.call.record
        ttft_s = (record.first_byte_at_s - ctx.started_at_s) if record.first_byte_at_s else 0.0
        if record.first_byte_at_s:
            self._metrics.labeled(self._metrics.ttft, ctx.parsed.route).observe(ttft_s)
        if status >= 500:
            self._metrics.upstream_errors.labels(ctx.placement.replica_id).inc()
        done = PlaceDone(request_id=ctx.request_id, replica_id=ctx.placement.replica_id,
                         model=ctx.parsed.model)
        # Billed once the replica accepted the request, and the quota settled
        # with the same (clamped) usage; refused before (by us or by every
        # replica tried): no usage event, and the admission is released.
        if record.accepted:
            event = self._usage_event(ctx, status, error_code, ttft_s, now_s)
            if ctx.admission is not None:
                self._quota.settle(ctx.admission, event.prompt_tokens, event.cached_tokens,
                                   event.completion_tokens)
        else:
            event = None
            if ctx.admission is not None:
                self._quota.release(ctx.admission)
        if ctx.placed_locally and self._fallback is not None:
            self._fallback.done(ctx.request_id)
        self._outbox.request_done(done, event)

    def _usage_event(self, ctx: RequestContext, status: int, error_code: str,
                     ttft_s: float, now_s: float) -> UsageEvent:
        record, parsed = ctx.call.record, ctx.parsed
        usage = record.usage
        reported = None if usage is None else Reported(
            usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        messages = len(parsed.body.messages) if isinstance(parsed.body, ChatBody) else 1
        billed, anomalies = clamp_usage(
            reported, prompt_bound_tokens=prompt_tokens_bound(len(parsed.prompt_bytes), messages),
            prompt_est_tokens=parsed.prompt_tokens_est, max_tokens=parsed.max_tokens or 0,
            seen_completion_tokens=record.content_chunks)
        for kind in anomalies:
            self._metrics.usage_anomalies.labels(kind).inc()
        return UsageEvent(
            request_id=ctx.request_id, tenant_id=ctx.principal.tenant_id,
            key_id=ctx.principal.key_id, model=parsed.model,
            replica_id=ctx.placement.replica_id, route=parsed.route,
            prompt_tokens=billed.prompt_tokens, cached_tokens=billed.cached_tokens,
            completion_tokens=billed.completion_tokens,
            ttft_ms=ttft_s * 1000, latency_ms=(now_s - ctx.started_at_s) * 1000,
            status=status, error_code=error_code, started_at_ms=ctx.started_at_ms,
            priority=ctx.place_req.priority, max_tokens=parsed.max_tokens or 0)

    async def _retry(self, ctx: RequestContext, exc: UpstreamFailed) -> bool:
        """Reports the failed replica and places the request again without
        it; False when it may not or cannot be (then the failure stands)."""
        failed = ctx.placement.replica_id
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(REPLICA_FAILED_SUBJECT, encode(ReplicaFailed(
                replica_id=failed, request_id=ctx.request_id, reason=exc.message)))
        if self._fallback is not None:
            self._fallback.replica_failed(failed)
        if ctx.place_req.attempt >= self.cfg.retries.max_attempts:
            return False
        if not self._budget.try_retry(time.monotonic()):
            self._metrics.retry_budget_exhausted.inc()
            return False
        retry_req = msgspec.structs.replace(
            ctx.place_req, exclude=(*ctx.place_req.exclude, failed),
            attempt=ctx.place_req.attempt + 1)
        try:
            placement, local = await self._place(retry_req)
        except YardError:
            # No other replica: the client gets the replica's failure.
            self._budget.refund(time.monotonic())
            return False
        self._metrics.upstream_errors.labels(failed).inc()
        self._metrics.retries.inc()
        # The failed attempt is not metered: the usage event is the serving
        # attempt's, under the same request id. Its load moved with the retry
        # (the scheduler released it when placing again, and its peers when
        # they hear the placement of attempt 2); the final completion notice
        # releases whatever is left.
        ctx.placement, ctx.place_req = placement, retry_req
        ctx.placed_locally = ctx.placed_locally or local
        ctx.upstream_wait_s += ctx.call.record.upstream_wait_s
        ctx.call = self._call(ctx.parsed, ctx.request_id, placement)
        return True

    def _call(self, parsed: ParsedRequest, request_id: str, placement: Placement) -> UpstreamCall:
        return self._replicas.call(placement.url, parsed.route, parsed.upstream_body,
                                   request_id, placement.replica_id)

    async def models(self, principal: Principal) -> tuple[ModelCard, ...]:
        """The models served now that `principal`'s tenant may call."""
        tenant = principal.inference_tenant()
        try:
            cards = models_reply_decoder.decode(
                await self._request(MODELS_SUBJECT, encode(ModelsQuery()))).models
        except NoCapacity:
            if self._fallback is None:
                raise
            cards = self._fallback.models()
        return tuple(card for card in cards if tenant.allows_model(card.id))

    async def _place_request(self, request_id: str, principal: Principal,
                             parsed: ParsedRequest, session_id: str,
                             priority: int) -> PlaceRequest:
        blocks = await self._hasher.block_hashes(parsed) if self._hasher else None
        chunks = (self._chunk_hashes(parsed) if self._chunking
                  or (self._hasher is not None and blocks is None) else ())
        return PlaceRequest(request_id=request_id, tenant_id=principal.tenant_id,
                            model=parsed.model, prompt_tokens=parsed.prompt_tokens_est,
                            max_tokens=parsed.max_tokens or self.cfg.ingress.default_max_tokens,
                            block_hashes=blocks or (), chunk_hashes=chunks,
                            session_id=session_id, priority=priority,
                            max_queue_s=self.cfg.ingress.max_queue_s)

    async def _place(self, req: PlaceRequest) -> tuple[Placement, bool]:
        """The placement, and whether this ingress made it (the fallback)."""
        fallback = self._fallback
        if fallback is not None and fallback.local(self._nc.is_connected):
            reason = "unreachable" if self._nc.is_connected else "disconnected"
            return self._decided(fallback.place(req, reason)), True
        # Asked while falling back: this placement is the probe.
        probe = fallback is not None and fallback.gate.active
        started_s = time.perf_counter()
        try:
            decision = await self._placer.place(place_subject(req.model), req)
        except BaseException as exc:
            # The scheduler may have counted it before the answer was lost (or
            # the client left): release it, or it pins the load until its TTL.
            self._outbox.placement_done(PlaceDone(request_id=req.request_id, replica_id="",
                                                  model=req.model))
            if fallback is None:
                raise
            if isinstance(exc, SchedulerUnreachable):
                fallback.unreachable()
                return self._decided(fallback.place(req, "unreachable")), True
            # A queued placement that timed out was heard by an actor; a
            # cancelled one (its client left) tells nothing.
            fallback.settled(probe, answered=isinstance(exc, YardError))
        if fallback is not None:
            fallback.settled(probe, answered=True)
        self._metrics.placement.observe(time.perf_counter() - started_s)
        return self._decided(decision), False

    def _decided(self, decision: Placement | PlaceRejected) -> Placement:
        if isinstance(decision, Placement):
            return decision
        error_type: type[YardError] = PLACEMENT_ERRORS.get(decision.code, NoCapacity)
        raise error_type(decision.message, param="model" if decision.code == "model_not_found"
                         else None, retry_after_s=decision.retry_after_s)

    def _chunk_hashes(self, parsed: ParsedRequest) -> tuple[int, ...]:
        params = self.cfg.scheduler.plugins.prefix_approx
        block_size_tokens = model_config(self.cfg, parsed.model).block_size_tokens
        chunk_bytes = max(1, round(block_size_tokens * params.bytes_per_token))
        return chunk_hashes(parsed.prompt_bytes, chunk_bytes, params.max_chunks)

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

