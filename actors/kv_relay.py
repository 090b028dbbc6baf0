"""Relays one replica's ZMQ KV-cache events onto NATS, in order, gaps filled.

The relay BINDS a SUB socket on loopback; the replica's vLLM connects its PUB
to it. A receive is pending from the moment of binding: libzmq passes a
SUB's subscription to a newly connected PUB only while the SUB is serviced,
and the PUB drops everything until then. The receiver only queues (bounded,
counting drops); the relayer checks sequence numbers, fills gaps from the
replica's replay ROUTER socket, and publishes KvEventsRelay / KvResync on
`yard.kv.<model>.<replica>`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from scheduler.config import AgentConfig
from scheduler.kv_events import END_SEQ, decode_seq, encode_seq
from scheduler.kv_sequence import KvSequence, Verdict, contiguous_tail
from scheduler.wire import KvEventsRelay, KvResync, encode, kv_subject

log = logging.getLogger("switchyard.kv_relay")

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
# Beyond the PUB's own high-water mark (vLLM: 100k) nothing would be gained.
SUB_RCVHWM = 100_000

Publish = Callable[[str, bytes], Awaitable[None]]
LookupReplay = Callable[[], Awaitable[str]]


class KvRelay:
    """Owned by a replica agent: bind(), then run() inside the agent's TaskGroup."""

    def __init__(self, cfg: AgentConfig, replica_id: str, model: str, topic: str,
                 publish: Publish, lookup_replay: LookupReplay,
                 bind_endpoint: str = LOOPBACK_ANY_PORT) -> None:
        self.cfg = cfg
        self.replica_id = replica_id
        self.model = model
        self.topic = topic.encode()
        self.subject = kv_subject(model, replica_id)
        self.endpoint = bind_endpoint
        self.counters: collections.Counter[str] = collections.Counter()
        # Why events are not relayed ("" relays them): a cache-config mismatch.
        self.refused = ""
        self._publish = publish
        self._lookup_replay = lookup_replay
        self._replay_endpoint = ""
        self._sequence = KvSequence()
        self._drop_next = 0
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(cfg.relay_queue_batches)
        self._ctx = zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None

    def bind(self) -> str:
        """Binds the SUB socket; returns the endpoint for the replica's kv-events config."""
        sub = self._ctx.socket(zmq.SUB)
        sub.set_hwm(SUB_RCVHWM)
        sub.subscribe(self.topic)
        try:
            sub.bind(self.endpoint)
        except zmq.ZMQError:
            sub.close(linger=0)
            raise
        self._sub = sub
        self.endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def run(self) -> None:
        """Receives and relays until cancelled. Starts with a resync: whatever a
        scheduler knew of this replica came from an earlier relay."""
        await self._resync("agent_start", 0)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive(), name=f"kv-receive-{self.replica_id}")
            group.create_task(self._relay_forever(), name=f"kv-relay-{self.replica_id}")

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        self._ctx.term()

    def drop_next_batches(self, count: int) -> None:
        """Fault injection for tests: the next `count` live batches are lost."""
        self._drop_next += count

    async def refuse(self, reason: str) -> None:
        """Stops relaying (or resumes, with reason ""); either way schedulers must
        forget this replica's index: events were or will be missing."""
        if reason == self.refused:
            return
        self.refused = reason
        await self._resync("cache_config", self._sequence.expected())

    def stats(self) -> dict[str, int | str]:
        return {**self.counters, "next_seq": self._sequence.expected(),
                "queued_batches": self._queue.qsize(), "endpoint": self.endpoint}

    async def _receive(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart(copy=True)
            if len(frames) != 3:
                self.counters["malformed_batches"] += 1
                continue
            topic, seq_frame, payload = frames
            if topic != self.topic:
                # SUB filters by prefix: "sim-1" also lets "sim-10" through.
                self.counters["other_topic_batches"] += 1
                continue
            if self._drop_next > 0:
                self._drop_next -= 1
                self.counters["test_dropped_batches"] += 1
                continue
            try:
                self._queue.put_nowait((decode_seq(seq_frame), payload))
            except asyncio.QueueFull:
                self.counters["dropped_batches"] += 1

    async def _relay_forever(self) -> None:
        while True:
            seq, payload = await self._queue.get()
            await self._relay_live(seq, payload)

    async def _relay_live(self, seq: int, payload: bytes) -> None:
        verdict = self._sequence.classify(seq)
        if verdict is Verdict.RESTART:
            self.counters["restarts"] += 1
            self._sequence.restart()
            self._replay_endpoint = ""  # a restarted replica may replay elsewhere
            await self._resync("restart", 0)
            verdict = self._sequence.classify(seq)
        if verdict is Verdict.GAP:
            await self._fill_gap(self._sequence.expected(), seq)
        await self._send(seq, payload, replayed=False)

    async def _fill_gap(self, start_seq: int, end_seq: int) -> None:
        batches = [(s, p) for s, p in await self._replay(start_seq) if start_seq <= s < end_seq]
        first = contiguous_tail([s for s, _ in batches], end_seq)
        if first == start_seq:
            self.counters["gaps_filled"] += 1
        else:
            self.counters["gaps_unfilled"] += 1
            log.warning("replica %s: KV events %d..%d lost (replay gave %d of them); resync",
                        self.replica_id, start_seq, first - 1, first - start_seq)
            await self._resync("gap", first)
        for seq, payload in batches:
            if seq >= first:
                await self._send(seq, payload, replayed=True)

    async def _replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        """The batches the replica still buffers from `start_seq` on ([] if it cannot say)."""
        if not self._replay_endpoint:
            self._replay_endpoint = await self._lookup_replay()
        if not self._replay_endpoint:
            return []
        dealer = self._ctx.socket(zmq.DEALER)
        batches: list[tuple[int, bytes]] = []
        try:
            dealer.connect(self._replay_endpoint)
            await dealer.send_multipart([b"", encode_seq(start_seq)])
            async with asyncio.timeout(self.cfg.replay_timeout_s):
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4 or frames[2] == END_SEQ:
                        break
                    batches.append((decode_seq(frames[2]), frames[3]))
        except (TimeoutError, zmq.ZMQError) as exc:
            self.counters["replay_failures"] += 1
            log.warning("replica %s: replay from %s failed: %r",
                        self.replica_id, self._replay_endpoint, exc)
        finally:
            dealer.close(linger=0)
        return batches

    async def _send(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        self._sequence.advance(seq)
        if self.refused:
            self.counters["refused_batches"] += 1
            return
        message = KvEventsRelay(replica_id=self.replica_id, model=self.model, seq=seq,
                                payload=payload, replayed=replayed)
        await self._publish(self.subject, encode(message))
        self.counters["replayed_batches" if replayed else "relayed_batches"] += 1

    async def _resync(self, reason: str, next_seq: int) -> None:
        self.counters["resyncs"] += 1
        await self._publish(self.subject, encode(KvResync(
            replica_id=self.replica_id, model=self.model, reason=reason, next_seq=next_seq)))
