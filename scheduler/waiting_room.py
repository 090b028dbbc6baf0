"""Placement under saturation: where a placement request waits when every
candidate replica is saturated (scheduler/saturation.py).

Such a request is refused at once (503 `no_capacity`, Retry-After) when it is
sheddable (priority < 0), may not wait (max_queue_s 0) or has no reply subject
to be answered on later; otherwise it waits in its model's FairQueue and is
told so (PlaceQueued), then answered on the same reply subject: with its
Placement when `dispatch` finds capacity, with `queue_timeout` (503) past its
deadline, or with `queue_full` (429) when the caps refuse it or push it out.
While a model's queue holds anything, new requests queue behind it rather
than overtake it. Each model has its own queue: one model's saturated fleet
does not hold up another's.

Pure: the shell (actors/scheduler.py) publishes the replies, calls `dispatch`
whenever capacity may have freed and `expire` from its one deadline timer.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.config import SaturationConfig
from scheduler.core import SchedulerCore, request_view
from scheduler.fair_queue import Entry, FairQueue
from scheduler.wire import Placement, PlaceQueued, PlaceRejected, PlaceRequest

PlaceAnswer = Placement | PlaceRejected | PlaceQueued


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to publish on `subject` (the request's reply inbox), for `req`
    (the shell tells its peers about placements)."""

    subject: str
    message: PlaceAnswer
    req: PlaceRequest


@dataclass(frozen=True, slots=True)
class _Waiting:
    req: PlaceRequest
    reply: str


class WaitingRoom:
    def __init__(self, core: SchedulerCore, cfg: SaturationConfig) -> None:
        self.core = core
        self.cfg = cfg
        self._queues: dict[str, FairQueue[_Waiting]] = {}
        # Bands reported even when empty, so a gauge fed from stats() drops to 0.
        self._bands_seen: set[int] = set()
        self.counts = dict.fromkeys(("enqueued", "dequeued", "shed", "queue_timeout",
                                     "queue_full", "queue_cancelled"), 0)

    def place(self, req: PlaceRequest, reply: str, now_s: float) -> list[Reply]:
        """Places `req` now, queues it, or refuses it."""
        queue = self._queues.get(req.model)
        if queue is not None and req.request_id in queue:
            # Sent again while waiting: answer the newest inbox, keep one entry.
            queue.remove(req.request_id)
        if not queue:
            decision = self.core.place_view(request_view(req, now_s), unless_saturated=True)
            if decision is not None:
                return [Reply(reply, decision, req)]
        if req.priority < 0 or req.max_queue_s <= 0 or not reply:
            self.counts["shed"] += 1
            why = "sheddable requests are not queued" if req.priority < 0 else "not queued"
            return [Reply(reply, self._refusal(req, "no_capacity",
                                               f"Every replica of `{req.model}` is saturated; "
                                               f"{why}."), req)]
        if queue is None:
            queue = self._queues[req.model] = FairQueue(self.cfg.queue_cap_requests,
                                                        self.cfg.tenant_queue_cap_requests)
        self._bands_seen.add(req.priority)
        refused = queue.push(req.request_id, req.tenant_id, req.priority,
                             now_s + req.max_queue_s, _Waiting(req, reply))
        replies = [self._full(entry) for entry in refused]
        if all(entry.key != req.request_id for entry in refused):
            self.counts["enqueued"] += 1
            replies.insert(0, Reply(reply, PlaceQueued(request_id=req.request_id), req))
        return replies

    def dispatch(self, now_s: float) -> list[Reply]:
        """Places waiting requests, in queue order, while their replicas have room."""
        replies = []
        for queue in self._queues.values():
            while (entry := queue.peek()) is not None:
                decision = self.core.place_view(request_view(entry.item.req, now_s),
                                                unless_saturated=True)
                if decision is None:
                    break
                queue.pop()
                self.counts["dequeued"] += 1
                replies.append(Reply(entry.item.reply, decision, entry.item.req))
        return replies

    def expire(self, now_s: float) -> list[Reply]:
        """Refuses the requests that waited as long as they may."""
        replies = []
        for model, queue in self._queues.items():
            for entry in queue.expire(now_s):
                self.counts["queue_timeout"] += 1
                req = entry.item.req
                replies.append(Reply(entry.item.reply, self._refusal(
                    req, "queue_timeout",
                    f"Every replica of `{model}` stayed saturated for {req.max_queue_s:g} s."),
                    req))
        return replies

    def cancel(self, model: str, request_id: str) -> bool:
        """Drops a waiting request whose client left (its completion notice came)."""
        queue = self._queues.get(model)
        if queue is None or queue.remove(request_id) is None:
            return False
        self.counts["queue_cancelled"] += 1
        return True

    def next_deadline_s(self) -> float | None:
        deadlines = [d for q in self._queues.values() if (d := q.next_deadline_s()) is not None]
        return min(deadlines, default=None)

    def stats(self) -> dict[str, int]:
        """Waiting requests per priority band, and what happened to them."""
        return {**self.queue_lengths(), **self.counts}

    def queue_lengths(self) -> dict[str, int]:
        """Waiting requests per priority band (all models)."""
        bands = dict.fromkeys(self._bands_seen, 0)
        for queue in self._queues.values():
            for priority, n in queue.lengths().items():
                bands[priority] += n
        return {f"queued_priority_{p}": n for p, n in sorted(bands.items())}

    def _full(self, entry: Entry[_Waiting]) -> Reply:
        self.counts["queue_full"] += 1
        return Reply(entry.item.reply, self._refusal(
            entry.item.req, "queue_full",
            f"The queue for `{entry.item.req.model}` is full for this tenant or priority."),
            entry.item.req)

    def _refusal(self, req: PlaceRequest, code: str, message: str) -> PlaceRejected:
        return PlaceRejected(request_id=req.request_id, code=code, message=message,
                             retry_after_s=self.cfg.retry_after_s)
