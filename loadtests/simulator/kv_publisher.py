"""A replica's KV-cache event publisher, with vLLM's ZMQ socket semantics.

A PUB socket sends each step's events as one batch: [topic, seq, payload]
(scheduler/kv_events.py has the encoding). Like vLLM it CONNECTS to a
`tcp://host:port` endpoint, so one subscriber binds and many replicas
connect to it, told apart by topic; an endpoint with `*` as host is bound
instead (on 127.0.0.1, at port + replica index). An optional ROUTER socket
answers replay requests from the last `buffer_batches` batches.

PUB drops while nobody is subscribed, as in vLLM: a subscriber sees a gap in
the sequence numbers and may replay it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from scheduler.config import SimulatorConfig
from scheduler.kv_events import (
    END_SEQ,
    KVCacheEvent,
    KVEventBatch,
    decode_seq,
    encode_batch,
    encode_seq,
)

LOOPBACK = "127.0.0.1"
# vLLM's defaults for the queue, the PUB high-water mark and the replay buffer.
MAX_QUEUE_BATCHES = 100_000
PUB_HWM = 100_000
BUFFER_BATCHES = 10_000
_DATA_PARALLEL_RANK = 0

log = logging.getLogger(__name__)


class KvEventPublisher:
    """Publishes the batches handed to `publish`; owned by its replica (start/aclose)."""

    def __init__(
        self,
        cfg: SimulatorConfig,
        index: int,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = cfg.kv_events_topic.replace("{index}", str(index))
        self.bind, self.endpoint = pub_endpoint(cfg.kv_events_endpoint, index)
        self.replay_endpoint = replay_endpoint(cfg.kv_events_replay_endpoint, index)
        self.dropped_batches = 0
        self._wall_clock = wall_clock
        self._queue: asyncio.Queue[KVEventBatch] = asyncio.Queue(MAX_QUEUE_BATCHES)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=BUFFER_BATCHES)
        self._ctx = zmq.asyncio.Context.instance()
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(PUB_HWM)
        try:
            if self.bind:
                self._pub.bind(self.endpoint)
                self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(self.replay_endpoint)
                # A wildcard port resolves to the one the OS picked.
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.topic}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_sockets()

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queues one step's events without waiting; a full queue drops and counts them."""
        batch = KVEventBatch(ts=self._wall_clock(), events=events,
                             data_parallel_rank=_DATA_PARALLEL_RANK)
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.dropped_batches += 1

    def source(self) -> dict[str, object]:
        """This publisher as vLLM's /kv_event_sources describes one (its KVEventsConfig)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint or None,
            "buffer_steps": BUFFER_BATCHES,
            "hwm": PUB_HWM,
            "max_queue_size": MAX_QUEUE_BATCHES,
            "topic": self.topic,
        }

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_batches())
                if self._replay is not None:
                    group.create_task(self._serve_replays())
        except* zmq.ZMQError as errors:
            # The replica keeps serving without events, as vLLM's engine does.
            log.error("kv events %s stopped: %s", self.topic, errors.exceptions)

    async def _send_batches(self) -> None:
        assert self._pub is not None
        topic = self.topic.encode()
        seq = 0
        while True:
            payload = encode_batch(await self._queue.get())
            # PUB never blocks: beyond the high-water mark zmq drops, as in vLLM.
            await self._pub.send_multipart((topic, encode_seq(seq), payload))
            self._buffer.append((seq, payload))
            seq += 1

    async def _serve_replays(self) -> None:
        assert self._replay is not None
        topic = self.topic.encode()
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("kv events %s: ignoring a replay request of %d frames",
                            self.topic, len(frames))
                continue
            client, _, start_frame = frames
            start_seq = decode_seq(start_frame)
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart(
                        (client, b"", topic, encode_seq(seq), payload))
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None


def pub_endpoint(endpoint: str, index: int) -> tuple[bool, str]:
    """(bind?, endpoint) of replica `index`'s PUB socket, by vLLM's rule: bind when the
    host is a wildcard, connect otherwise. The simulator binds on loopback only."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"KV-events endpoint must be tcp://host:port, got {endpoint!r}")
    if parts.hostname in ("*", None):
        return True, f"tcp://{LOOPBACK}:{parts.port + index}"
    return False, endpoint


def replay_endpoint(endpoint: str, index: int) -> str:
    """Where replica `index` binds its replay socket ("" for none); port 0: any free port."""
    if not endpoint:
        return ""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"KV-events replay endpoint must be tcp://host:port, got {endpoint!r}")
    port = "*" if parts.port == 0 else str(parts.port + index)
    return f"tcp://{LOOPBACK}:{port}"
