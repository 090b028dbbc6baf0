"""What precise prefix routing costs the ingress per prompt: rendering and
tokenizing it (the tiny model's tokenizer and chat template), hashing its
blocks as vLLM does, and what that does to the event loop.

For chat prompts of about 1k and 6k tokens it prints, per size: the p50/p99
of tokenize and hash alone (one thread, no event loop), and, with
`concurrency` requests hashed at once through PromptHasher, the p50 time per
request and the longest event-loop stall, first with every prompt hashed on
the loop and then with the configured thread pool. JSON, then a table.

    python -m loadtests.bench_prompt_hashing [--rounds 50] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from prometheus_client import CollectorRegistry, Counter

from deploy.tiny_model import TINY_MODEL_DIR
from router.prompt_blocks import PromptHasher, prompt_token_ids, request_block_hashes
from router.prompt_tokens import load_tokenizer
from router.requests import ChatBody, ParsedRequest, parse_request
from scheduler.config import IngressConfig, ModelConfig

MODEL = "switchyard-tiny"
SIZES_TOKENS = (1_000, 6_000)
SETTINGS = ModelConfig(tokenizer_dir=str(TINY_MODEL_DIR), block_size_tokens=16)
LOOP_TICK_S = 0.001


def _request(target_tokens: int) -> ParsedRequest:
    """A chat request whose prompt has about `target_tokens` tokens."""
    corpus = (TINY_MODEL_DIR / "corpus.txt").read_text()
    tokenizer = load_tokenizer(SETTINGS.tokenizer_dir)
    text, chars = corpus, target_tokens * 3
    while len(text) < chars:
        text += corpus
    for _ in range(20):
        body = json.dumps({"model": MODEL, "messages": [
            {"role": "system", "content": "You are a railway dispatcher."},
            {"role": "user", "content": text[:chars]}]}).encode()
        parsed = parse_request("chat", body)
        assert isinstance(parsed.body, ChatBody)
        ids = prompt_token_ids(tokenizer, parsed.body) or []
        if abs(len(ids) - target_tokens) < target_tokens // 50:
            return parsed
        chars = int(chars * target_tokens / max(1, len(ids)))
    return parsed


def _quantiles_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    # The minimum is what the work costs on an idle core; p50/p99 add the machine's load.
    return {"min_ms": round(ordered[0] * 1000, 3),
            "p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


def _alone(parsed: ParsedRequest, rounds: int) -> dict[str, object]:
    """Tokenizing alone, and tokenizing plus hashing (what the ingress does)."""
    tokenizer = load_tokenizer(SETTINGS.tokenizer_dir)
    assert isinstance(parsed.body, ChatBody)
    tokenize_s, total_s = [], []
    ids: list[int] | None = []
    for _ in range(rounds):
        started = time.perf_counter()
        ids = prompt_token_ids(tokenizer, parsed.body)
        tokenized = time.perf_counter()
        request_block_hashes(tokenizer, SETTINGS, parsed.body, parsed.cache_salt)
        tokenize_s.append(tokenized - started)
        total_s.append(time.perf_counter() - tokenized)
    return {"prompt_tokens": len(ids or []), "tokenize": _quantiles_ms(tokenize_s),
            "tokenize_and_hash": _quantiles_ms(total_s)}


async def _through_hasher(parsed: ParsedRequest, inline_max_bytes: int, threads: int,
                          concurrency: int, rounds: int) -> dict[str, float]:
    outcomes = Counter("hashing", "outcomes", ["outcome"], registry=CollectorRegistry())
    hasher = PromptHasher({MODEL: SETTINGS}, threads, inline_max_bytes, outcomes)
    await hasher.start()
    loop = asyncio.get_running_loop()
    stalls_s: list[float] = []

    async def watch() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_TICK_S)
            stalls_s.append(loop.time() - before - LOOP_TICK_S)

    async def one() -> float:
        started = time.perf_counter()
        await hasher.block_hashes(parsed)
        return time.perf_counter() - started

    watcher = asyncio.create_task(watch())
    latencies_s: list[float] = []
    try:
        for _ in range(max(1, rounds // concurrency)):
            latencies_s += await asyncio.gather(*(one() for _ in range(concurrency)))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        hasher.aclose()
    shed = outcomes.labels("shed")._value.get()
    return {"request_p50_ms": round(statistics.median(latencies_s) * 1000, 3),
            "max_loop_stall_ms": round(max(stalls_s, default=0.0) * 1000, 3),
            "shed": shed}


async def _main(rounds: int, concurrency: int) -> dict[str, object]:
    ingress = IngressConfig()
    results: dict[str, object] = {"threads": ingress.tokenizer_threads,
                                  "inline_max_bytes": ingress.tokenize_inline_max_bytes,
                                  "concurrency": concurrency, "sizes": {}}
    for size in SIZES_TOKENS:
        parsed = _request(size)
        results["sizes"][str(size)] = {  # type: ignore[index]
            "prompt_bytes": len(parsed.prompt_bytes),
            "alone": _alone(parsed, rounds),
            "on_loop": await _through_hasher(parsed, 1 << 30, ingress.tokenizer_threads,
                                             concurrency, rounds),
            "pooled": await _through_hasher(parsed, ingress.tokenize_inline_max_bytes,
                                            ingress.tokenizer_threads, concurrency, rounds),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_prompt_hashing")
    parser.add_argument("--rounds", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    results = asyncio.run(_main(args.rounds, args.concurrency))
    print(json.dumps(results))
    print(f"{'tokens':>7} {'tokenize p50':>13} {'+hash min':>10} {'+hash p50':>10} "
          f"{'loop stall on loop':>19} {'loop stall pooled':>18} {'pooled p50':>11}")
    for r in results["sizes"].values():  # type: ignore[union-attr]
        alone = r["alone"]
        print(f"{alone['prompt_tokens']:>7} {alone['tokenize']['p50_ms']:>10.2f} ms "
              f"{alone['tokenize_and_hash']['min_ms']:>7.2f} ms "
              f"{alone['tokenize_and_hash']['p50_ms']:>7.2f} ms "
              f"{r['on_loop']['max_loop_stall_ms']:>16.2f} ms "
              f"{r['pooled']['max_loop_stall_ms']:>15.2f} ms "
              f"{r['pooled']['request_p50_ms']:>8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
