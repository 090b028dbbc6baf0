"""Sequence numbers of one replica's KV-event publisher, as its relay sees them.

vLLM numbers batches per publisher from 0, one by one. On the live (PUB/SUB)
stream a number can only jump ahead (batches lost: a gap, fillable from the
replay socket) or fall back (the publisher restarted, its cache is new).
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    NEXT = "next"        # relay it
    GAP = "gap"          # batches [expected, seq) are missing: replay them first
    RESTART = "restart"  # the publisher started again: drop what is known of its cache


class KvSequence:
    def __init__(self) -> None:
        # The next sequence number expected; None before the first batch.
        self.next_seq: int | None = None

    def classify(self, seq: int) -> Verdict:
        """What a live batch numbered `seq` means, given what came before."""
        expected = 0 if self.next_seq is None else self.next_seq
        if seq == expected:
            return Verdict.NEXT
        if seq > expected:
            return Verdict.GAP
        return Verdict.RESTART

    def expected(self) -> int:
        return 0 if self.next_seq is None else self.next_seq

    def advance(self, seq: int) -> None:
        self.next_seq = seq + 1

    def restart(self) -> None:
        self.next_seq = 0


def contiguous_tail(seqs: list[int], end: int) -> int:
    """The first number of the longest run `k, k+1, ..., end-1` at the end of
    the ascending `seqs` (`end` when seqs does not reach end-1): what a
    partial replay can still contribute right before batch `end`."""
    start = end
    for seq in reversed(seqs):
        if seq != start - 1:
            break
        start = seq
    return start
