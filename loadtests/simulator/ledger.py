"""Ground truth: what each request really cost on this replica.

Tests and load generators compare what a router reported (usage, aborts)
against these records, fetched from GET /sim/requests/{request_id}.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

DEFAULT_CAPACITY_REQUESTS = 10_000


class RequestRecord(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_tokens: int
    # The prefix-cache hit when first scheduled (usage's cached_tokens); 0 until then.
    cached_tokens: int = 0
    # Prompt tokens the engine computed, recomputation after preemption included;
    # without preemption, prompt_tokens - cached_tokens once prefill is done.
    computed_prompt_tokens: int = 0
    preemptions: int = 0
    # Tokens generated and handed to the response so far (an EOS token counts, as
    # in vLLM usage).
    completion_tokens: int = 0
    # True once no more tokens will come: completed or aborted.
    finished: bool = False
    aborted: bool = False
    # "stop", "length" or "abort" once finished.
    finish_reason: str | None = None
    # The request's cache_salt as received ("" for none): what a router sent.
    cache_salt: str = ""
    # Wall-clock Unix seconds, comparable across processes.
    started_at_s: float
    ended_at_s: float | None = None


class RequestLedger:
    """The most recent records by request id; the oldest are dropped beyond capacity."""

    def __init__(self, capacity_requests: int = DEFAULT_CAPACITY_REQUESTS) -> None:
        self.capacity_requests = capacity_requests
        self.dropped_records = 0
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

    def add(self, record: RequestRecord) -> None:
        # A reused id replaces the older record and counts as the newest.
        self._records.pop(record.request_id, None)
        self._records[record.request_id] = record
        while len(self._records) > self.capacity_requests:
            self._records.popitem(last=False)
            self.dropped_records += 1

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def request_ids(self) -> list[str]:
        """Ids from oldest to newest."""
        return list(self._records)
