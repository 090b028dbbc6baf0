"""What the webhook sends: CloudEvents 1.0 in structured JSON mode, signed
the Standard Webhooks way, and the budget alerts' thresholds.

The signature is `v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`
in `webhook-signature`, beside `webhook-id` (the event id: a usage record's
request id, so a receiver deduplicates redeliveries by it) and
`webhook-timestamp` (unix seconds, so a receiver can refuse replays).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping

import msgspec

from scheduler.wire import UsageEvent
from scheduler.wire.usage import BudgetAlert

USAGE_TYPE = "dev.switchyard.usage.v1"
BUDGET_TYPE = "dev.switchyard.budget.v1"
BUDGET_THRESHOLDS_PCT = (50, 80, 100)
CONTENT_TYPE = "application/cloudevents+json"




def rfc3339(at_s: float) -> str:
    return dt.datetime.fromtimestamp(at_s, dt.UTC).isoformat(timespec="milliseconds"
                                                             ).replace("+00:00", "Z")


def usage_cloudevent(event: UsageEvent, cost_nusd: int, source: str) -> dict[str, object]:
    """The billed usage row: the event's fields (without its wire tag) and its cost."""
    data = msgspec.to_builtins(event)
    data.pop("kind", None)
    data["cost_nusd"] = cost_nusd
    return {"specversion": "1.0", "id": event.request_id, "source": source,
            "type": USAGE_TYPE, "subject": event.tenant_id,
            "time": rfc3339(event.started_at_ms / 1000), "datacontenttype": "application/json",
            "data": data}


def budget_cloudevent(alert: BudgetAlert, source: str) -> dict[str, object]:
    return {"specversion": "1.0", "id": alert.event_id, "source": source,
            "type": BUDGET_TYPE, "subject": alert.tenant_id, "time": rfc3339(alert.at_s),
            "datacontenttype": "application/json", "data": msgspec.to_builtins(alert)}


def crossed_thresholds(spent_nusd: int, budget_nusd: int) -> tuple[int, ...]:
    """The thresholds (percent) that `spent_nusd` has reached; none without a budget."""
    if budget_nusd <= 0:
        return ()
    return tuple(pct for pct in BUDGET_THRESHOLDS_PCT if spent_nusd * 100 >= pct * budget_nusd)


def signature(secret: bytes, event_id: str, timestamp_s: int, body: bytes) -> str:
    signed = f"{event_id}.{timestamp_s}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: bytes, event_id: str, timestamp_s: int, body: bytes
                   ) -> dict[str, str]:
    return {"content-type": CONTENT_TYPE, "webhook-id": event_id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": signature(secret, event_id, timestamp_s, body)}


def verify(secret: bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """A receiver's check: one of the (space-separated) signatures matches."""
    try:
        expected = signature(secret, headers["webhook-id"],
                             int(headers["webhook-timestamp"]), body)
    except (KeyError, ValueError):
        return False
    return any(hmac.compare_digest(expected, given)
               for given in headers.get("webhook-signature", "").split())
