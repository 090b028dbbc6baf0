"""Outlier ejection (Envoy's, driven by the ingress's failure reports): a
replica that failed a request before its first byte gets no placements for
base_s × n, capped at max_s, where n counts its ejections since it last
stayed admitted for max_s. It is re-admitted after the period, on the next
healthy report from its agent; a replica without an agent, after the period
alone. Reports about a replica already ejected change nothing: one outage
seen by many requests at once is one ejection."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.config import EjectionConfig


@dataclass(slots=True)
class _Record:
    count: int = 0
    ejected: bool = False
    until_s: float = 0.0
    readmitted_at_s: float = 0.0


class Ejections:
    def __init__(self, cfg: EjectionConfig) -> None:
        self._base_s = cfg.base_s
        self._max_s = cfg.max_s
        self._records: dict[str, _Record] = {}

    def eject(self, replica_id: str, now_s: float) -> float | None:
        """Ejects the replica; returns the period, or None if it already was."""
        record = self._records.setdefault(replica_id, _Record())
        if record.ejected:
            return None
        if record.count and now_s - record.readmitted_at_s >= self._max_s:
            record.count = 0
        record.count += 1
        period_s = min(self._base_s * record.count, self._max_s)
        record.ejected, record.until_s = True, now_s + period_s
        return period_s

    def is_ejected(self, replica_id: str) -> bool:
        record = self._records.get(replica_id)
        return record is not None and record.ejected

    def healthy_report(self, replica_id: str, now_s: float) -> bool:
        """A passing health check; True when it re-admits the replica."""
        record = self._records.get(replica_id)
        if record is None or not record.ejected or now_s < record.until_s:
            return False
        record.ejected, record.readmitted_at_s = False, now_s
        return True

    def ejected_ids(self) -> list[str]:
        return [rid for rid, record in self._records.items() if record.ejected]

    def forget(self, replica_id: str) -> None:
        """The replica left the registry."""
        self._records.pop(replica_id, None)
