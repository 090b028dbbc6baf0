"""Load scores kept between decisions (scheduler/load_totals.py) decide exactly
as scores recomputed for each decision: random traces of placements,
completions, load reports, KV events, health changes and retries are replayed
through a profile fed the load journal and through a twin recomputing
everything, and every decision's pick, totals and answers must be equal to
the last bit; the recomputed load answers must equal the straightforward
formulas below (the ones in use before the journal)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import pytest

import scheduler.load_totals as load_totals
from scheduler.config import ModelConfig, ProfileConfig, ScorerRef, decode_config
from scheduler.framework import Decision, Profile, ReplicaId, ReplicaView, SchedRequest
from scheduler.kv_events import BlockStored
from scheduler.load_totals import LoadJournal
from scheduler.registry import PluginState, build_profile
from scheduler.scorers import Cost

MODELS = {"m": ModelConfig(block_size_tokens=16), "n": ModelConfig(block_size_tokens=4)}
ALL_LOADS = ProfileConfig(scorers=(
    ScorerRef(name="kv-cache-usage", weight=0.7), ScorerRef(name="in-flight-tokens", weight=2.0),
    ScorerRef(name="session-affinity", weight=1.5), ScorerRef(name="queue-depth", weight=0.3),
    ScorerRef(name="in-flight-requests", weight=1.0)))


def _lower_is_better(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    scale = 1.0 / (hi - lo)
    return [(hi - v) * scale for v in values]


def _reference(name: str, scorer: object, req: SchedRequest,
               views: list[ReplicaView]) -> list[float] | None:
    """A load scorer's answer by the formulas used before the journal."""
    if name == "in-flight-requests":
        return _lower_is_better([r.in_flight_requests for r in views])
    if name == "in-flight-tokens":
        return _lower_is_better([r.in_flight_tokens for r in views])
    if name == "queue-depth":
        return _lower_is_better([r.waiting + r.placed_since_report for r in views])
    if name == "kv-cache-usage":
        return [1.0 - min(1.0, max(0.0, r.kv_cache_usage)) for r in views]
    if name == "cost":
        assert isinstance(scorer, Cost)
        block = MODELS[req.model].block_size_tokens
        prompt_blocks = max(len(req.block_hashes), len(req.chunk_hashes),
                            -(-req.prompt_tokens // block))
        held, of_blocks = scorer._held_runs(req)
        per_block = scorer.prefill_weight * prompt_blocks / of_blocks if of_blocks else 0.0
        saved = {rid: matched * per_block for rid, matched in held.items()}.get
        return _lower_is_better([
            (tokens if (tokens := r.in_flight_tokens / block)
             > (used := r.kv_cache_usage * r.capacity_blocks) else used) - saved(r.id, 0.0)
            for r in views])
    return None


@dataclass
class _Twin:
    """One profile with its own plugin state and views; `journal` None: recomputes."""

    profile: Profile
    state: PluginState
    views: list[ReplicaView]
    rng: random.Random
    journal: LoadJournal | None
    in_flight: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The last decision and a deep copy of its scores as they were made.
    last: tuple[Decision, list[object]] | None = None

    def note(self, index: int) -> None:
        if self.journal is not None:
            self.journal.note(self.views[index].id)


def _twins(profile_name: str, seed: int) -> tuple[_Twin, _Twin]:
    cfg = decode_config({"scheduler": {"replica_capacity_blocks": 64}}, {}).scheduler
    profile_cfg = ALL_LOADS if profile_name == "all-loads" else cfg.profiles[profile_name]
    rng = random.Random(seed)
    views = [ReplicaView(id=ReplicaId(f"r{i}"), url="", capacity_blocks=64,
                         models=rng.choice([("m",), ("m", "n"), ("n",)])) for i in range(12)]
    twins = []
    for journal in (LoadJournal(), None):
        state = PluginState.from_config(cfg, MODELS)
        twins.append(_Twin(build_profile(profile_name, profile_cfg, state), state,
                           copy.deepcopy(views), random.Random(seed), journal))
    return twins[0], twins[1]


def _request(rng: random.Random, step: int, prompts: list[tuple[int, ...]]) -> SchedRequest:
    prompt = rng.choice(prompts) + tuple(rng.getrandbits(64) for _ in range(rng.randrange(3)))
    exclude = frozenset({f"r{rng.randrange(12)}"}) if rng.random() < 0.05 else frozenset()
    return SchedRequest(request_id=f"q{step}", tenant_id="t", model=rng.choice("mmn"),
                        now_s=step * 0.01, prompt_tokens=16 * len(prompt),
                        max_tokens=rng.choice([0, 16, 256]),
                        block_hashes=prompt if rng.random() < 0.7 else (),
                        chunk_hashes=prompt, session_id=f"s{rng.randrange(20)}", exclude=exclude)


def _step(twins: tuple[_Twin, _Twin], rng: random.Random, step: int, version: int,
          prompts: list[tuple[int, ...]]) -> int:
    """One random event applied to both twins; returns the state version after it."""
    kind = rng.choices(["place", "done", "load", "kv", "health"], [10, 5, 2, 1, 0.3])[0]
    i = rng.randrange(12)
    if kind == "place":
        req = _request(rng, step, prompts)
        decisions = [t.profile.decide(req, t.views, t.rng, version, t.journal) for t in twins]
        kept, fresh = decisions
        if twins[0].last is not None:
            # Kept answers are never changed under an earlier decision's explain().
            earlier, scores = twins[0].last
            assert [earlier.totals, *earlier.answers] == scores
        twins[0].last = (kept, copy.deepcopy([kept.totals, *kept.answers]))
        assert (kept.chosen, kept.candidates, kept.totals, kept.answers) == (
            fresh.chosen, fresh.candidates, fresh.totals, fresh.answers)
        views = [v for v in twins[1].views if v.id in fresh.candidates]
        for weighted, answer in zip(twins[1].profile.scorers, fresh.answers, strict=True):
            expected = _reference(weighted.scorer.name, weighted.scorer, req, views)
            assert expected is None or answer == expected
        if kept.chosen is not None:
            for t in twins:
                j = next(k for k, v in enumerate(t.views) if v.id == kept.chosen)
                view, tokens = t.views[j], req.prompt_tokens + req.max_tokens
                view.in_flight_requests += 1
                view.in_flight_tokens += tokens
                view.placed_since_report += 1
                t.in_flight[req.request_id] = (j, tokens)
                t.note(j)
                t.profile.observe(req, view)
    elif kind == "done" and twins[0].in_flight:
        request_id = rng.choice(sorted(twins[0].in_flight))
        for t in twins:
            j, tokens = t.in_flight.pop(request_id)
            t.views[j].in_flight_requests -= 1
            t.views[j].in_flight_tokens -= tokens
            t.note(j)
    elif kind == "load":
        waiting, usage, capacity = rng.randrange(4), rng.choice([0.0, 0.5, rng.random()]), \
            rng.choice([64, 64, 128])
        for t in twins:
            t.views[i].waiting, t.views[i].kv_cache_usage = waiting, usage
            t.views[i].placed_since_report = 0
            t.views[i].capacity_blocks = capacity
            t.state.set_capacity(t.views[i].id, capacity)
            t.note(i)
    elif kind == "kv":
        prompt = rng.choice(prompts)
        stored = list(prompt[:rng.randrange(1, len(prompt) + 1)])
        for t in twins:
            t.state.precise.apply_events(t.views[i].id, [BlockStored(
                block_hashes=stored,
                parent_block_hash=None, token_ids=[], block_size=16, lora_id=None,
                medium="GPU", lora_name=None)])
    elif kind == "health":
        for t in twins:
            t.views[i].healthy = not t.views[i].healthy
        return version + 1
    return version


@pytest.mark.parametrize("journal_max_changes", [4_096, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("profile_name", ["least-load", "prefix-precise", "prefix-approx",
                                          "cost", "all-loads"])
def test_kept_load_scores_decide_as_recomputed_ones(profile_name: str, seed: int,
                                                    journal_max_changes: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_totals, "JOURNAL_MAX_CHANGES", journal_max_changes)
    twins = _twins(profile_name, seed)
    rng = random.Random(seed * 1_000)
    prompts = [tuple(rng.getrandbits(64) for _ in range(rng.randrange(1, 8))) for _ in range(6)]
    version = 0
    for step in range(1_500):
        version = _step(twins, rng, step, version, prompts)
    assert twins[0].in_flight == twins[1].in_flight
