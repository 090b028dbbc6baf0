"""Quota wire messages round-trip; refusals become the right OpenAI errors."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.errors import (
    BudgetExhausted,
    ModelNotPriced,
    RateLimited,
    TokensRateLimited,
    YardError,
    quota_refusal,
)
from scheduler.quota_ledger import OpenRequest
from scheduler.quota_terms import LeaseSlice, RateLimitNumbers, Verdict
from scheduler.tenancy import Price
from scheduler.wire import (
    QuotaCommit,
    QuotaLeaseReturn,
    QuotaRelease,
    QuotaReply,
    QuotaReserve,
    encode,
    quota_call_decoder,
    quota_reply_decoder,
    quota_subject,
)

NUMBERS = RateLimitNumbers(limit_requests=100, remaining_requests=0, limit_tokens=1_000,
                           remaining_tokens=10, reset_requests_s=2.0, reset_tokens_s=2.0)


@pytest.mark.parametrize(("message", "decoder"), [
    (QuotaReserve(tenant_id="t", request_id="r", model="m", prompt_tokens=5, max_tokens=7,
                  lease_id="l"), quota_call_decoder),
    (QuotaCommit(tenant_id="t", request_id="r", model="m", prompt_tokens=5, cached_tokens=2,
                 completion_tokens=3), quota_call_decoder),
    (QuotaRelease(tenant_id="t", request_id="r"), quota_call_decoder),
    (QuotaLeaseReturn(tenant_id="t", lease_id="l", used_requests=3, used_tokens=40,
                      spent_nusd=900, still_open=(OpenRequest("r", 10, 100),)),
     quota_call_decoder),
    (QuotaReply(verdict=Verdict(refusal="tokens", retry_after_s=3.5, numbers=NUMBERS)),
     quota_reply_decoder),
    (QuotaReply(lease=LeaseSlice(requests=5, nusd=10, ttl_s=2.0, price=Price(
        effective_from_s=0, input_nusd_per_token=1, cached_input_nusd_per_token=0,
        output_nusd_per_token=2))), quota_reply_decoder),
    (QuotaReply(error="redis"), quota_reply_decoder),
])
def test_quota_messages_round_trip(message: object, decoder: msgspec.json.Decoder) -> None:
    assert decoder.decode(encode(message)) == message


def test_each_shard_has_its_subject() -> None:
    assert [quota_subject(i) for i in range(2)] == ["yard.quota.0", "yard.quota.1"]


@pytest.mark.parametrize(("refusal", "cls", "status", "type_", "code", "retry_header"), [
    ("requests", RateLimited, 429, "requests", "rate_limit_exceeded", True),
    ("tokens", TokensRateLimited, 429, "tokens", "rate_limit_exceeded", True),
    ("too_large", TokensRateLimited, 429, "tokens", "rate_limit_exceeded", False),
    ("concurrency", RateLimited, 429, "requests", "rate_limit_exceeded", True),
    ("budget", BudgetExhausted, 429, "insufficient_quota", "insufficient_quota", True),
    ("unpriced", ModelNotPriced, 403, "invalid_request_error", "model_not_priced", False),
])
def test_refusals_are_openai_errors(refusal: str, cls: type[YardError], status: int,
                                    type_: str, code: str, retry_header: bool) -> None:
    verdict = Verdict(refusal=refusal, retry_after_s=2.0 if retry_header else None,  # type: ignore[arg-type]
                      numbers=NUMBERS)
    err = quota_refusal(verdict, "t-1", "m")
    assert type(err) is cls and err.status == status
    body = msgspec.json.decode(err.payload())["error"]
    assert (body["type"], body["code"]) == (type_, code)
    assert (err.retry_after_s is not None) == retry_header
    if isinstance(err, RateLimited):
        assert err.headers()["x-ratelimit-remaining-tokens"] == "10"
