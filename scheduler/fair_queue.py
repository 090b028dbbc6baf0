"""Per-tenant fair queues inside priority bands, with deadlines and caps.

Bands are served highest priority first. Inside a band tenants take turns
(round robin, each tenant's own entries oldest first), so one tenant's burst
cannot starve another tenant's single request. Every entry has a deadline
(`expire` hands back the ones past it). A tenant over its cap gets its new
entry refused; over the total cap one entry is pushed out of the lowest band:
the newest entry of the tenant holding most of that band, which may be the
entry just pushed. Sheddable (negative) bands are thus emptied first, and a
burst pays for itself before anyone else's request does.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Entry(Generic[T]):
    key: str
    tenant_id: str
    priority: int
    deadline_s: float
    item: T
    # Arrival order, across bands and tenants.
    seq: int


class FairQueue(Generic[T]):
    def __init__(self, cap: int, tenant_cap: int) -> None:
        self.cap = cap
        self.tenant_cap = tenant_cap
        # priority -> tenant -> that tenant's entries, oldest first; the
        # OrderedDict's order is the round robin's (next tenant first).
        self._bands: dict[int, OrderedDict[str, deque[Entry[T]]]] = {}
        self._entries: dict[str, Entry[T]] = {}
        self._tenant_counts: dict[str, int] = {}
        # (deadline, seq, key), pruned lazily: removed entries stay until they surface.
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def push(self, key: str, tenant_id: str, priority: int, deadline_s: float,
             item: T) -> list[Entry[T]]:
        """Queues `item` under the unique `key`; returns what the caps refused:
        nothing, the new entry itself, or the entry it pushed out."""
        if key in self._entries:
            raise ValueError(f"{key} is already queued")
        self._seq += 1
        entry = Entry(key, tenant_id, priority, deadline_s, item, self._seq)
        if self._tenant_counts.get(tenant_id, 0) >= self.tenant_cap:
            return [entry]
        self._entries[key] = entry
        self._tenant_counts[tenant_id] = self._tenant_counts.get(tenant_id, 0) + 1
        self._bands.setdefault(priority, OrderedDict()).setdefault(tenant_id, deque()).append(entry)
        heapq.heappush(self._deadlines, (deadline_s, entry.seq, key))
        if len(self._deadlines) > 2 * len(self._entries) + 64:
            self._deadlines = [(e.deadline_s, e.seq, e.key) for e in self._entries.values()]
            heapq.heapify(self._deadlines)
        if len(self._entries) > self.cap:
            victim = self._victim()
            self._remove(victim)
            return [victim]
        return []

    def peek(self) -> Entry[T] | None:
        """The entry `pop` would return."""
        if not self._bands:
            return None
        tenants = self._bands[max(self._bands)]
        return tenants[next(iter(tenants))][0]

    def pop(self) -> Entry[T] | None:
        """The next entry: highest band, the tenant whose turn it is, its oldest."""
        entry = self.peek()
        if entry is not None:
            self._remove(entry)
            tenants = self._bands.get(entry.priority)
            if tenants is not None and entry.tenant_id in tenants:
                tenants.move_to_end(entry.tenant_id)
        return entry

    def remove(self, key: str) -> Entry[T] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._remove(entry)
        return entry

    def expire(self, now_s: float) -> list[Entry[T]]:
        """Removes and returns the entries whose deadline is at or before `now_s`."""
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now_s:
            _, seq, key = heapq.heappop(self._deadlines)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                self._remove(entry)
                expired.append(entry)
        return expired

    def next_deadline_s(self) -> float | None:
        while self._deadlines:
            deadline_s, seq, key = self._deadlines[0]
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                return deadline_s
            heapq.heappop(self._deadlines)
        return None

    def lengths(self) -> dict[int, int]:
        """Entries queued per priority band."""
        return {p: sum(map(len, tenants.values())) for p, tenants in self._bands.items()}

    def _victim(self) -> Entry[T]:
        tenants = self._bands[min(self._bands)]
        # The tenant holding most of the lowest band; of equals, the one that queued last.
        entries = max(tenants.values(), key=lambda q: (len(q), q[-1].seq))
        return entries[-1]

    def _remove(self, entry: Entry[T]) -> None:
        del self._entries[entry.key]
        count = self._tenant_counts[entry.tenant_id] - 1
        if count:
            self._tenant_counts[entry.tenant_id] = count
        else:
            del self._tenant_counts[entry.tenant_id]
        tenants = self._bands[entry.priority]
        entries = tenants[entry.tenant_id]
        entries.remove(entry)
        if not entries:
            del tenants[entry.tenant_id]
            if not tenants:
                del self._bands[entry.priority]
