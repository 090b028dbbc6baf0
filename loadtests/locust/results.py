"""locust's CSV statistics (`<prefix>_stats.csv`), read back into the rows
the suites produce, and the checks a run must pass."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

# The tenant users' requests (the abusive tenant's are apart).
TENANT_REQUESTS = ("chat", "chat stream", "session turn")
STREAMS = ("chat stream", "session turn")
ABUSIVE = "chat (abusive tenant)"
EXPECTED_429 = ("429", "rate limited (expected)")


@dataclass(frozen=True)
class Row:
    kind: str  # locust's Type: POST, TTFT, ITL, 429
    name: str
    requests: int
    failures: int
    median_ms: float
    p99_ms: float
    rps: float


def read_stats(prefix: Path) -> dict[tuple[str, str], Row]:
    """(type, name) -> row; locust's 'Aggregated' row is left out."""
    rows = {}
    with Path(f"{prefix}_stats.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r["Name"] == "Aggregated":
                continue
            rows[(r["Type"], r["Name"])] = Row(
                kind=r["Type"], name=r["Name"], requests=int(r["Request Count"]),
                failures=int(r["Failure Count"]), median_ms=_number(r["50%"]),
                p99_ms=_number(r["99%"]), rps=_number(r["Requests/s"]))
    return rows


def _number(text: str) -> float:
    return float(text) if text not in ("", "N/A") else 0.0


def tenant_rps(rows: dict[tuple[str, str], Row]) -> float:
    """The tenant users' successful requests per second (a refusal is no throughput)."""
    return sum(r.rps * (r.requests - r.failures) / r.requests for (kind, name), r in rows.items()
               if kind == "POST" and name in TENANT_REQUESTS and r.requests)


def problems(rows: dict[tuple[str, str], Row]) -> list[str]:
    """What makes a run fail: any failed request (the abusive tenant's 429s
    with their headers count as successes), a suite row missing, or an
    abusive tenant never refused."""
    found = [f"{r.failures} failures in {r.kind} {r.name}" for r in rows.values() if r.failures]
    for name in TENANT_REQUESTS:
        if not rows.get(("POST", name), Row("", "", 0, 0, 0, 0, 0)).requests:
            found.append(f"no {name} requests")
    for kind in ("TTFT", "ITL"):
        for name in STREAMS:
            if ((kind, name)) not in rows:
                found.append(f"no {kind} row for {name}")
    if not rows.get(EXPECTED_429):
        found.append("the abusive tenant was never refused with 429")
    return found


def summary(rows: dict[tuple[str, str], Row]) -> dict[str, object]:
    out: dict[str, object] = {"tenant_rps": round(tenant_rps(rows), 1)}
    for (kind, name), r in sorted(rows.items()):
        out[f"{kind} {name}"] = {"count": r.requests, "failures": r.failures,
                                 "p50_ms": r.median_ms, "p99_ms": r.p99_ms,
                                 "rps": round(r.rps, 1)}
    return out
