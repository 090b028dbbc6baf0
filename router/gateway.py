"""The path of one request, shared by the HTTP and NATS front ends:
authenticate, validate, admit against the tenant's quota, place (NATS
round trip to a scheduler actor), call
the replica (retried on another one while the client has no byte yet), and
at the end hand usage and a completion notice to the outbox and settle the
quota."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from router.auth import Authenticator, Principal
from router.metrics import Metrics
from router.outbox import Outbox
from router.placer import Placer
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
    UpstreamFailed,
    UsageSpoolFull,
    YardError,
)
from scheduler.retry_budget import RetryBudget
from scheduler.usage_clamp import Reported, clamp_usage, prompt_tokens_bound
from scheduler.wire import (
    MODELS_SUBJECT,
    REPLICA_FAILED_SUBJECT,
    ModelCard,
    ModelsQuery,
    PlaceDone,
    Placement,
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


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


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
    # Settled (or released) once, when the request ends.
    admission: Admission


class Gateway:
    def __init__(self, cfg: Config, auth: Authenticator, nc: NATS, placer: Placer,
                 replicas: ReplicaClient, outbox: Outbox, metrics: Metrics,
                 hasher: PromptHasher | None, quota: QuotaClient) -> None:
        self.cfg = cfg
        self._quota = quota
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
                               tenant.limits.max_tokens_cap)
        if not tenant.allows_model(parsed.model):
            # The scheduler's answer for a model nobody serves: whether it exists is not told.
            raise ModelNotFound(f"The model `{parsed.model}` does not exist.", param="model")
        # Before placement: a refused request never reaches a scheduler or a replica.
        admission = await self._quota.admit(tenant.tenant_id, request_id, parsed.model,
                                            parsed.prompt_tokens_est, parsed.max_tokens or 0,
                                            tenant.limits)
        try:
            place_req = await self._place_request(request_id, principal, parsed,
                                                  session_id or parsed.user,
                                                  principal.priority.resolve(priority))
            placement = await self._place(place_req)
        except BaseException:
            # Not placed (refused, timed out, client gone): nothing was spent.
            self._quota.release(admission)
            raise
        self._budget.note_request(started_at_s)
        return RequestContext(request_id, principal, parsed, place_req, placement,
                              self._call(parsed, request_id, placement),
                              started_at_s, int(time.time() * 1000), admission)

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
            self._metrics.ttft.labels(ctx.parsed.route).observe(ttft_s)
        if status >= 500:
            self._metrics.upstream_errors.labels(ctx.placement.replica_id).inc()
        done = PlaceDone(request_id=ctx.request_id, replica_id=ctx.placement.replica_id,
                         model=ctx.parsed.model)
        # Billed once the replica accepted the request, and the quota settled
        # with the same (clamped) usage; refused before (by us or by every
        # replica tried): no usage event, and the admission is released.
        if record.accepted:
            event = self._usage_event(ctx, status, error_code, ttft_s, now_s)
            self._quota.settle(ctx.admission, event.prompt_tokens, event.cached_tokens,
                               event.completion_tokens)
        else:
            event = None
            self._quota.release(ctx.admission)
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
        if ctx.place_req.attempt >= self.cfg.retries.max_attempts:
            return False
        if not self._budget.try_retry(time.monotonic()):
            self._metrics.retry_budget_exhausted.inc()
            return False
        retry_req = msgspec.structs.replace(
            ctx.place_req, exclude=(*ctx.place_req.exclude, failed),
            attempt=ctx.place_req.attempt + 1)
        try:
            placement = await self._place(retry_req)
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
        ctx.call = self._call(ctx.parsed, ctx.request_id, placement)
        return True

    def _call(self, parsed: ParsedRequest, request_id: str, placement: Placement) -> UpstreamCall:
        return self._replicas.call(placement.url, parsed.route, parsed.upstream_body,
                                   request_id, placement.replica_id)

    async def models(self, principal: Principal) -> tuple[ModelCard, ...]:
        """The models served now that `principal`'s tenant may call."""
        tenant = principal.inference_tenant()
        reply = await self._request(MODELS_SUBJECT, encode(ModelsQuery()))
        return tuple(card for card in models_reply_decoder.decode(reply).models
                     if tenant.allows_model(card.id))

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

    async def _place(self, req: PlaceRequest) -> Placement:
        started_s = time.perf_counter()
        try:
            decision = await self._placer.place(place_subject(req.model), req)
        except BaseException:
            # The scheduler may have counted it before the answer was lost (or
            # the client left): release it, or it pins the load until its TTL.
            self._outbox.placement_done(PlaceDone(request_id=req.request_id, replica_id="",
                                                  model=req.model))
            raise
        self._metrics.placement.observe(time.perf_counter() - started_s)
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

