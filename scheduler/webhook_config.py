"""The `[webhooks]` section of the one config (scheduler/config.py, which
holds it as `Config.webhooks`; a module of its own for that file's size cap)."""

from __future__ import annotations

import msgspec


class WebhooksConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Usage records and budget alerts POSTed as signed CloudEvents."""
    # "" : no webhook (and no budget alerts).
    url: str = ""
    # HMAC-SHA256 key of the signatures (SWITCHYARD_WEBHOOK_SECRET).
    secret: str = ""
    source: str = "switchyard"
    timeout_s: float = 5.0
    # Deliveries of one event; after the last failure it is a dead letter.
    max_attempts: int = 8
    backoff_first_s: float = 1.0
    backoff_max_s: float = 60.0
    batch_max: int = 100
    budget_check_interval_s: float = 10.0
    alert_stream: str = "YARD_ALERTS"
    dead_letter_stream: str = "YARD_WEBHOOK_DLQ"
