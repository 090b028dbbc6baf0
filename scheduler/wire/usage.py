"""The messages of the usage API (usage rows and statement usage, answered by
the metering service) and of the webhook's budget alerts; their subjects are
in scheduler/wire/__init__.py with every other subject. JSON via msgspec; new fields
always get defaults."""

from __future__ import annotations

from typing import Literal

import msgspec

from scheduler.wire.base import _Msg

UsageGroup = Literal["model", "key", "day", "hour", "minute"]
TIME_GROUPS: tuple[UsageGroup, ...] = ("day", "hour", "minute")


class UsageRowsQuery(_Msg, tag="usage_rows_query"):
    """Usage in [from_ms, to_ms) (whole minutes: the rollup's grain), one row
    per tenant and each group given; at most one of day/hour/minute."""
    tenant_id: str | None = None
    from_ms: int = 0
    to_ms: int = 0
    group_by: tuple[UsageGroup, ...] = ()


class UsageRow(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One row of the usage API; a group's field is present only when grouped
    by it (the time bucket's start as ISO 8601 UTC), every measure always."""
    tenant_id: str
    model: str | None = None
    key_id: str | None = None
    day: str | None = None
    hour: str | None = None
    minute: str | None = None
    requests: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_nusd: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    cache_hit_rate: float


class UsageRowsReply(_Msg, tag="usage_rows"):
    rows: tuple[UsageRow, ...] = ()
    error: str = ""


class StatementQuery(_Msg, tag="statement_query"):
    """A tenant's billed usage in [from_ms, to_ms), split at `breaks_s`
    (unix seconds inside the range where some model's price changes)."""
    tenant_id: str
    from_ms: int
    to_ms: int
    breaks_s: tuple[int, ...] = ()


class StatementUsage(msgspec.Struct, frozen=True, kw_only=True):
    """A model's usage in one piece of the range: piece i starts at
    breaks_s[i - 1] (piece 0 at the range's start)."""
    model: str
    piece: int
    requests: int
    uncached_input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    # As billed at ingest, request by request.
    cost_nusd: int


class StatementReply(_Msg, tag="statement_usage"):
    usage: tuple[StatementUsage, ...] = ()
    error: str = ""


class BudgetAlert(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's billed spend reached `threshold_pct` of its budget in the
    period starting at `period_start_s`."""
    tenant_id: str
    period: str
    period_start_s: int
    threshold_pct: int
    budget_nusd: int
    spent_nusd: int
    at_s: int

    @property
    def event_id(self) -> str:
        return (f"budget-{self.tenant_id}-{self.period}-{self.period_start_s}"
                f"-{self.threshold_pct}")


usage_rows_query_decoder = msgspec.json.Decoder(UsageRowsQuery)
usage_rows_reply_decoder = msgspec.json.Decoder(UsageRowsReply)
statement_query_decoder = msgspec.json.Decoder(StatementQuery)
statement_reply_decoder = msgspec.json.Decoder(StatementReply)
budget_alert_decoder = msgspec.json.Decoder(BudgetAlert)
