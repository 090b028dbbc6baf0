"""locust suites for switchyard's OpenAI API (run in locust's own process).

Tenant users (each on one tenant's key, tenants dealt out in turn) mix
non-streaming chat, streaming chat and multi-turn sessions (x-session-id;
each turn resends the tenant's system prompt and the conversation so far,
so turns share a growing prefix). Four abusive users (`fixed_count`, whatever
the user count) send faster than their tenant's requests-per-minute limit: its 429s are
expected and counted as successes, in their own row, once they carry
Retry-After and x-ratelimit-* headers. Streams report TTFT and ITL (the mean
gap between a stream's content chunks) as rows of their own
(request_type "TTFT" / "ITL").

FastHttpUser (geventhttpclient) rather than the openai SDK: it costs a
fraction of the CPU per request, and the load generator shares this
machine's two cores with the stack it measures; SSE lines are read off the
socket as they arrive, so the timings are the client's own.

    locust -f loadtests/locust/locustfile.py --keys-file var/loadtest/keys.json \
        --host http://127.0.0.1:8080 --headless -u 40 -r 20 -t 60s

The keys file comes from `python -m loadtests.locust.run` (loadtests/locust/stack.py).
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from pathlib import Path

from locust import constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser

from loadtests.locust.sse import read_stream

CHAT_PATH = "/v1/chat/completions"
SESSION_TURNS = 6
ABUSIVE_USERS = 4
# Headers every 429 must carry (OpenAI's, plus the standard one).
RATE_LIMIT_HEADERS = ("retry-after", "x-ratelimit-limit-requests",
                      "x-ratelimit-remaining-requests")
QUESTIONS = ("How do I rotate an API key?", "Summarise the last invoice.",
             "What limits apply to my account?", "Explain prefix caching in one line.",
             "Which replica served this?", "Write a haiku about routers.")
SYSTEM_PROMPT = ("You are the support assistant of {name}. Answer briefly and politely. "
                 "Policies: keys are secrets; never repeat them. Limits are per minute. "
                 "Invoices are monthly, in US dollars, itemised by model and by key. "
                 "Escalate outages to the on-call engineer of {name}. ")


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--keys-file", default="var/loadtest/keys.json",
                        help="tenants, keys and model written by loadtests.locust.run")
    parser.add_argument("--rps-per-user", type=float, default=0.0,
                        help="requests per second of each tenant user; 0: back to back")
    parser.add_argument("--abusive-rps", type=float, default=10.0,
                        help="requests per second of the abusive tenant's users together")
    parser.add_argument("--max-tokens", type=int, default=24)


_tenant_turn = itertools.count()
_keys_cache: dict[str, dict] = {}


def _keys(environment) -> dict:
    path = environment.parsed_options.keys_file
    if path not in _keys_cache:
        _keys_cache[path] = json.loads(Path(path).read_text())
    return _keys_cache[path]


def _headers(key: str) -> dict[str, str]:
    # identity: SSE lines are read off the wire as they come.
    return {"Authorization": f"Bearer {key}", "Accept-Encoding": "identity"}


class TenantUser(FastHttpUser):
    network_timeout = 60.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        rate = self.environment.parsed_options.rps_per_user
        return constant_throughput(rate)(self) if rate > 0 else 0.0

    def on_start(self) -> None:
        keys = _keys(self.environment)
        tenant = keys["tenants"][next(_tenant_turn) % len(keys["tenants"])]
        self.model = keys["model"]
        self.headers = _headers(tenant["key"])
        self.system = {"role": "system", "content": SYSTEM_PROMPT.format(name=tenant["name"])}
        self.max_tokens = self.environment.parsed_options.max_tokens
        self._new_session()

    def _new_session(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.history: list[dict[str, str]] = []

    def _body(self, messages: list[dict[str, str]], stream: bool) -> dict:
        # min_tokens (vLLM's): an answer that stopped at once would carry no token to time.
        return {"model": self.model, "messages": messages, "stream": stream,
                "max_tokens": random.randint(self.max_tokens // 2, self.max_tokens),
                "min_tokens": self.max_tokens // 2}

    def _question(self) -> dict[str, str]:
        number = random.randrange(10**6)
        return {"role": "user", "content": f"{random.choice(QUESTIONS)} (#{number})"}

    @task(3)
    def chat(self) -> None:
        body = self._body([self.system, self._question()], stream=False)
        with self.client.post(CHAT_PATH, json=body, headers=self.headers, name="chat",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {_error_message(resp)}")
            elif b'"choices"' not in resp.content:
                resp.failure("no choices in the answer")

    @task(3)
    def chat_stream(self) -> None:
        self._stream("chat stream", [self.system, self._question()], self.headers)

    @task(2)
    def session_turn(self) -> None:
        question = self._question()
        messages = [self.system, *self.history, question]
        headers = {**self.headers, "x-session-id": self.session_id}
        text = self._stream("session turn", messages, headers)
        if text is None or len(self.history) >= 2 * (SESSION_TURNS - 1):
            self._new_session()
        else:
            self.history += [question, {"role": "assistant", "content": text}]

    def _stream(self, name: str, messages: list[dict[str, str]],
                headers: dict[str, str]) -> str | None:
        """One streamed chat; reports it (its whole duration), its TTFT and ITL;
        returns its text, None when it failed."""
        sent_s = time.perf_counter()
        with self.client.post(CHAT_PATH, json=self._body(messages, stream=True), headers=headers,
                              name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {_error_message(resp)}")
                return None
            # geventhttpclient's own response reads up to a separator; the
            # wrapper's readline() knows only CRLF, and SSE lines end in LF.
            raw = resp._response
            reading = read_stream(lambda: raw.readline(b"\n"), time.perf_counter, sent_s)
            resp.request_meta["response_time"] = (time.perf_counter() - sent_s) * 1000
            resp.request_meta["response_length"] = len(reading.text)
            if not reading.done or reading.error or not reading.content_chunks:
                resp.failure(f"stream incomplete: done={reading.done} error={reading.error!r} "
                             f"chunks={reading.content_chunks}")
                return None
        self._fire("TTFT", name, reading.ttft_ms)
        if reading.mean_itl_ms is not None:
            self._fire("ITL", name, reading.mean_itl_ms)
        return reading.text

    def _fire(self, kind: str, name: str, value_ms: float | None) -> None:
        self.environment.events.request.fire(request_type=kind, name=name,
                                             response_time=value_ms, response_length=0,
                                             exception=None, context={})


class AbusiveUser(FastHttpUser):
    """One tenant sending far above its requests-per-minute limit, from several
    users at once (above its concurrency limit too)."""

    fixed_count = ABUSIVE_USERS
    network_timeout = 60.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        rate = self.environment.parsed_options.abusive_rps / ABUSIVE_USERS
        return constant_throughput(rate)(self) if rate > 0 else 0.0

    def on_start(self) -> None:
        keys = _keys(self.environment)
        self.headers = _headers(keys["abusive"]["key"])
        self.body = {"model": keys["model"], "max_tokens": 8,
                     "messages": [{"role": "user", "content": "Again, and again, and again."}]}

    @task
    def hammer(self) -> None:
        sent_s = time.perf_counter()
        with self.client.post(CHAT_PATH, json=self.body, headers=self.headers,
                              name="chat (abusive tenant)", catch_response=True) as resp:
            if resp.status_code == 200:
                return
            if resp.status_code != 429:
                resp.failure(f"{resp.status_code}: {_error_message(resp)}")
                return
            missing = [h for h in RATE_LIMIT_HEADERS if not resp.headers.get(h)]
            if missing:
                resp.failure(f"429 without {', '.join(missing)}")
                return
            resp.success()
        self.environment.events.request.fire(
            request_type="429", name="rate limited (expected)",
            response_time=(time.perf_counter() - sent_s) * 1000, response_length=0,
            exception=None, context={})


def _error_message(resp) -> str:
    try:
        return str(json.loads(resp.content)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return (resp.text or "")[:200] if resp.content else repr(getattr(resp, "error", ""))
