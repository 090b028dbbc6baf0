"""Quota calls from the ingress to the shard owning a tenant (QUOTA_SUBJECT)."""

from __future__ import annotations

from scheduler.quota_ledger import OpenRequest
from scheduler.quota_terms import LeaseSlice, Verdict
from scheduler.wire.base import _Msg


class QuotaReserve(_Msg, tag="quota_reserve"):
    """Idempotent by request id. With `lease_id`, a lease sized by this request
    is tried first; if granted, the ingress admits the request under it."""

    tenant_id: str
    request_id: str
    model: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    lease_id: str = ""


class QuotaCommit(_Msg, tag="quota_commit"):
    """A reserved request's true usage (the shard prices it); frees the rest."""

    tenant_id: str
    request_id: str
    model: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class QuotaRelease(_Msg, tag="quota_release"):
    """A reserved request failed or was abandoned: nothing spent."""

    tenant_id: str
    request_id: str


class QuotaLeaseReturn(_Msg, tag="quota_lease_return"):
    """Use under a lease (tokens, spend: the completed requests'); the requests
    still running become reservations."""

    tenant_id: str
    lease_id: str
    used_requests: int = 0
    used_tokens: int = 0
    spent_nusd: int = 0
    still_open: tuple[OpenRequest, ...] = ()


class QuotaReply(_Msg, tag="quota_reply"):
    """`lease` granted, else `verdict`; `error`: not done (Redis away), resend."""

    verdict: Verdict = Verdict()
    lease: LeaseSlice | None = None
    error: str = ""


QuotaCall = QuotaReserve | QuotaCommit | QuotaRelease | QuotaLeaseReturn
