"""The one error tree. Each error knows its HTTP status and OpenAI error body;
the ingress maps them in a single place (HTTP middleware, NATS front end)."""

from __future__ import annotations

from typing import Any

import msgspec

from scheduler.quota_terms import RateLimitNumbers, Verdict


class YardError(Exception):
    """Base of every error switchyard reports to a client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        replica_id: str | None = None,
        tenant_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.replica_id = replica_id
        self.tenant_id = tenant_id

    def headers(self) -> dict[str, str]:
        """Response headers of its own, beyond Retry-After."""
        return {}

    def payload(self) -> bytes:
        """The response body, JSON-encoded."""
        return msgspec.json.encode(self.body())

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(YardError):
    code = "config_error"


class InvalidRequest(YardError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class AuthenticationFailed(YardError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(YardError):
    """A valid key that may not do this: a suspended tenant, a platform admin
    key calling inference, a role without the right."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class RecordNotFound(YardError):
    """A control-plane record (tenant, key) that does not exist, or is
    another tenant's: the two are not told apart."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(YardError):
    """The record's state forbids the change (a name taken, a key already
    revoked or rotated)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelNotFound(YardError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(YardError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(YardError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamFailed(YardError):
    """The chosen replica failed before or while answering."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamRejected(YardError):
    """The replica refused the request (4xx); its own OpenAI error body is
    passed on unchanged, with its status."""

    type = "invalid_request_error"

    def __init__(self, status: int, raw_body: bytes, *, replica_id: str) -> None:
        super().__init__(f"replica rejected the request ({status})", replica_id=replica_id)
        self.status = status
        self.raw_body = raw_body

    def payload(self) -> bytes:
        try:
            msgspec.json.decode(self.raw_body)
        except msgspec.DecodeError:
            return super().payload()
        return self.raw_body


class NoCapacity(YardError):
    """No replica can take the request now (none healthy, or scheduler away)."""

    status = 503
    type = "overloaded_error"
    code = "no_capacity"


class SchedulerOverloaded(NoCapacity):
    """A scheduler actor had more placement requests waiting than it keeps."""

    code = "scheduler_overloaded"


class SchedulerUnreachable(NoCapacity):
    """No scheduler actor answered the placement at all (NATS away, none
    subscribed, or none answering): the ingress may place it itself."""


class QueueTimeout(NoCapacity):
    """Every replica stayed saturated for as long as the request may wait."""

    code = "queue_timeout"


class QueueFull(YardError):
    """The fair queue refused the request: its tenant holds its share of the
    queue already, or it was pushed out by higher-priority work."""

    status = 429
    type = "overloaded_error"
    code = "queue_full"


class ServiceUnavailable(YardError):
    """A dependency switchyard needs (Redis, NATS) cannot be reached."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class QuotaUnavailable(ServiceUnavailable):
    """The owner of the tenant's quota did not answer in time: fail closed."""

    code = "quota_unavailable"


class RateLimited(YardError):
    """Requests or tokens per minute, or concurrent requests, used up;
    `numbers` fill OpenAI's x-ratelimit-* headers."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, numbers: RateLimitNumbers, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.numbers = numbers

    def headers(self) -> dict[str, str]:
        return self.numbers.headers()


class TokensRateLimited(RateLimited):
    type = "tokens"


class BudgetExhausted(RateLimited):
    """The tenant's budget for this period is spent (or held by requests in
    flight); OpenAI's `insufficient_quota`, told apart from rate limits."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class ModelNotPriced(YardError):
    """The model has no price: it is never served unbilled, for any tenant."""

    status = 403
    type = "invalid_request_error"
    code = "model_not_priced"


def quota_refusal(verdict: Verdict, tenant_id: str, model: str) -> YardError:
    """The error for a refused quota verdict."""
    kw: dict[str, Any] = {"numbers": verdict.numbers, "tenant_id": tenant_id,
                          "retry_after_s": verdict.retry_after_s}
    match verdict.refusal:
        case "requests":
            return RateLimited("Rate limit reached for requests per minute.", **kw)
        case "tokens":
            return TokensRateLimited("Rate limit reached for tokens per minute.", **kw)
        case "too_large":
            return TokensRateLimited(
                "Request too large for tokens per minute: lower max_tokens or the prompt.", **kw)
        case "concurrency":
            return RateLimited("Too many concurrent requests.", **kw)
        case "budget":
            return BudgetExhausted("You exceeded your current quota (budget for this period).",
                                   **kw)
        case _:
            return ModelNotPriced(f"Model {model} has no price; it cannot be used on a budget.",
                                  param="model", tenant_id=tenant_id)


class UsageSpoolFull(ServiceUnavailable):
    """NATS is away and the ingress's usage spool is full: a request served
    now could not be metered, so it is refused (fail closed)."""

    code = "usage_spool_full"


class InternalError(YardError):
    status = 500
    type = "server_error"
    code = "internal_error"


# Error codes carried in placement replies, mapped back to classes by the ingress.
PLACEMENT_ERRORS: dict[str, type[YardError]] = {
    "model_not_found": ModelNotFound,
    "no_capacity": NoCapacity,
    "queue_timeout": QueueTimeout,
    "queue_full": QueueFull,
    "scheduler_overloaded": SchedulerOverloaded,
}
