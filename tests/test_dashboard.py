"""The usage dashboard in headless Chromium: usage seeded through the real
pipeline (UsageEvents on JetStream, ingested and priced by the real
MeteringService into chDB), the page served by the real admin API on
loopback, a key typed into it. What each chart drew (the page's published
summary) must equal the seeded truth, every chart's canvas must show its
series' colours, the page must call nothing but the admin API, and a
screenshot is kept under var/test-artifacts/."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from actors.control_plane import PRICES_KEY
from router.admin_handlers import Call
from router.dashboard import dashboard_handlers
from scheduler.control import SYSTEM
from scheduler.errors import RecordNotFound, ServiceUnavailable
from scheduler.tenancy import price_at
from scheduler.wire import UsageEvent
from tests.admin_stack import AdminStack, running_admin
from tests.billing_stack import PRICES, eventually, metering_config, publish
from tests.chromium import CHROMIUM, Page, running_chromium
from tests.harness import nats_client, running_metering

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts"
DASHBOARD_REDIS_DB = 22
WINDOW_FROM_S = 1_791_158_400  # 2026-10-05T00:00:00Z
WINDOW_S = 6 * 3600  # minute buckets: 360 of them
MODELS = ("big", "tiny")
VIEWPORT = (1400, 1900)


@dataclass
class Seeded:
    admin: AdminStack
    events: list[UsageEvent]

    def shown(self, tenant_id: str) -> list[UsageEvent]:
        """The events the page's window covers for `tenant_id`."""
        return [e for e in self.events if e.tenant_id == tenant_id
                and WINDOW_FROM_S * 1000 <= e.started_at_ms < (WINDOW_FROM_S + WINDOW_S) * 1000]


def _events(tenant_a: str, tenant_b: str, rng: random.Random) -> list[UsageEvent]:
    """Tenant A in the window (two models, some errors, bursts and gaps), and
    what the page must leave out: tenant B in the window, A the day before."""
    events = []
    busy_minutes = rng.sample(range(WINDOW_S // 60), 150)
    for tenant, count, day_offset_s in ((tenant_a, 900, 0), (tenant_b, 200, 0),
                                        (tenant_a, 100, -86_400)):
        for _ in range(count):
            started_s = WINDOW_FROM_S + day_offset_s + 60 * rng.choice(busy_minutes)
            prompt = rng.randrange(1, 3_000)
            events.append(UsageEvent(
                request_id=f"dash-{uuid.uuid4().hex}", tenant_id=tenant,
                key_id=f"key-{rng.randrange(2)}",
                model="big" if rng.random() < 0.3 else "tiny", replica_id="r0", route="chat",
                prompt_tokens=prompt, cached_tokens=rng.randrange(0, prompt + 1),
                completion_tokens=rng.randrange(1, 800), ttft_ms=rng.uniform(5, 400),
                latency_ms=rng.uniform(400, 4_000),
                status=500 if rng.random() < 0.05 else 200,
                started_at_ms=started_s * 1000 + rng.randrange(60_000)))
    return events


@pytest_asyncio.fixture(scope="module")
async def seeded(tmp_path_factory: pytest.TempPathFactory, private_bus: str,
                 redis_url: str) -> AsyncIterator[Seeded]:
    work = tmp_path_factory.mktemp("dashboard")
    async with running_admin(work, private_bus, redis_url, DASHBOARD_REDIS_DB) as admin:
        for model, prices in PRICES.items():
            await admin.plane.redis.hset(PRICES_KEY, model, msgspec.json.encode(prices))
        events = _events(admin.tenant_a, admin.tenant_b, random.Random(11))
        async with (running_metering(metering_config(admin.cfg, work)) as metering,
                    nats_client(private_bus) as nc):
            await publish(nc, events)

            async def stored() -> bool:
                return metering.stats()["inserted_rows"] == len(events)

            await eventually(stored, "the seeded usage to be stored")
            yield Seeded(admin, events)


def _truth(events: list[UsageEvent]) -> dict[str, dict[str, float]]:
    """Per model: the sums each chart must draw, and how many minutes have a
    request (the cache chart's points: every prompt has tokens) or an answered
    one (the TTFT chart's: its quantiles leave errors out)."""
    truth: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    minutes: dict[str, set[int]] = defaultdict(set)
    answered: dict[str, set[int]] = defaultdict(set)
    for e in events:
        t = truth[e.model]
        price = price_at(PRICES[e.model], e.started_at_ms / 1000)
        assert price is not None
        t["requests"] += 1
        t["errors"] += e.status >= 400
        t["prompt_tokens"] += e.prompt_tokens
        t["cached_tokens"] += e.cached_tokens
        t["completion_tokens"] += e.completion_tokens
        t["cost_nusd"] += price.cost_nusd(e.prompt_tokens, e.cached_tokens, e.completion_tokens)
        minutes[e.model].add(e.started_at_ms // 60_000)
        if e.status < 400:
            answered[e.model].add(e.started_at_ms // 60_000)
    for model, t in truth.items():
        t["minutes"] = len(minutes[model])
        t["answered_minutes"] = len(answered[model])
    return truth


async def _sign_in(page: Page, url: str, key: str) -> tuple[str, str]:
    """Loads the page, types the key into its form, and waits until it has
    drawn or failed: its state and status line."""
    await page.send("Page.navigate", url=url)
    await page.evaluate("new Promise(r => document.readyState === 'complete' ? r() :"
                        " addEventListener('load', () => r()))")
    await page.evaluate("document.getElementById('key').focus()")
    await page.send("Input.insertText", text=key)
    await page.evaluate("document.getElementById('login').requestSubmit()")
    state = await page.evaluate(
        "new Promise((resolve) => { const t0 = Date.now(); (function poll() {"
        " const s = document.body.dataset.state;"
        " if (s === 'ready' || s === 'error' || Date.now() - t0 > 20000) resolve(s);"
        " else setTimeout(poll, 50); })(); })")
    return state, await page.evaluate("document.getElementById('status').textContent")


async def _open(page: Page, url: str, key: str) -> dict:
    """Signs in and returns what the page drew."""
    state, status = await _sign_in(page, url, key)
    assert state == "ready", f"the page ended {state!r}: {status}"
    return await page.evaluate("window.switchyardDashboard")


# Per chart, how many pixels of each series' colour its canvas holds.
_PAINTED = """
(() => {
  const rgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const out = {};
  for (const [name, chart] of Object.entries(window.switchyardDashboard.charts)) {
    const canvas = document.querySelector('#chart-' + name + ' canvas');
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    out[name] = chart.series.map((s) => {
      const [r, g, b] = rgb(s.color);
      let n = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (px[i] === r && px[i + 1] === g && px[i + 2] === b && px[i + 3] > 0) n++;
      }
      return n;
    });
  }
  return out;
})()
"""


def _check_charts(summary: dict, truth: dict[str, dict[str, float]]) -> None:
    assert summary["grain"] == "minute" and summary["buckets"] == WINDOW_S // 60
    assert summary["models"] == sorted(truth)
    charts = summary["charts"]
    for chart, measure in (("requests", "requests"), ("errors", "errors")):
        drawn = {s["label"]: s for s in charts[chart]["series"]}
        for model in truth:
            assert drawn[model]["sum"] == truth[model][measure], (chart, model)
            assert drawn[model]["points"] == summary["buckets"]
    cost = {s["label"]: s["sum"] for s in charts["cost"]["series"]}
    for model in truth:
        assert cost[model] == pytest.approx(truth[model]["cost_nusd"] / 1e9, rel=1e-9)
    tokens = {s["label"]: s["sum"] for s in charts["tokens"]["series"]}
    assert tokens == {
        "input": sum(t["prompt_tokens"] for t in truth.values()),
        "cached input": sum(t["cached_tokens"] for t in truth.values()),
        "output": sum(t["completion_tokens"] for t in truth.values())}
    ttft = {s["label"]: s["points"] for s in charts["ttft"]["series"]}
    cache = {s["label"]: s["points"] for s in charts["cache"]["series"]}
    for model in truth:
        assert ttft[f"{model} p50"] == ttft[f"{model} p99"] == truth[model]["answered_minutes"]
        assert cache[model] == truth[model]["minutes"]
    totals = {r["model"]: r for r in summary["totals"]}
    for model, t in truth.items():
        for measure in ("requests", "errors", "prompt_tokens", "cached_tokens",
                        "completion_tokens", "cost_nusd"):
            assert totals[model][measure] == t[measure], (model, measure)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
async def test_the_dashboard_charts_the_seeded_usage(seeded: Seeded, tmp_path: Path) -> None:
    admin = seeded.admin
    url = (f"{admin.url}/admin/v1/dashboard#tenant={admin.tenant_a}&range=custom"
           "&from=2026-10-05T00:00&to=2026-10-05T06:00")
    truth = _truth(seeded.shown(admin.tenant_a))
    async with running_chromium(tmp_path) as browser:
        page = await browser.new_page(*VIEWPORT)
        summary = await _open(page, url, admin.keys["platform"])
        assert summary["tenant_id"] == admin.tenant_a
        _check_charts(summary, truth)
        painted = await page.evaluate(_PAINTED)
        assert all(n > 20 for counts in painted.values() for n in counts), painted
        tenants = await page.evaluate(
            "[...document.getElementById('tenant').options].map(o => o.value)")
        assert sorted(tenants) == sorted([admin.tenant_a, admin.tenant_b])
        shot = await page.screenshot(ARTIFACTS / "dashboard.png")
        print(f"dashboard screenshot: {shot}")

        # A viewer of tenant B sees tenant B only, whatever the link names.
        viewer = await browser.new_page(*VIEWPORT)
        b_key = (await admin.plane.create_key(
            SYSTEM, "test-dash", admin.tenant_b, role="viewer")).plaintext
        summary_b = await _open(viewer, url, b_key)
        assert summary_b["tenant_id"] == admin.tenant_b
        _check_charts(summary_b, _truth(seeded.shown(admin.tenant_b)))
        assert await viewer.evaluate("document.getElementById('tenant').disabled") is True

        # A user key may not read usage: refused, and not kept.
        user = await browser.new_page(*VIEWPORT)
        state, status = await _sign_in(user, url, admin.keys["a_user"])
        assert state == "error" and status.startswith("403"), status
        assert await user.evaluate(
            "[sessionStorage.length, document.getElementById('login').hidden]") == [0, False]

        # data: URLs are the browser's own (its date pickers' icons), not fetched.
        requested = [params["request"]["url"] for method, params, _ in browser.events
                     if method == "Network.requestWillBeSent"
                     and not params["request"]["url"].startswith("data:")]
        assert requested and all(u.startswith(admin.url + "/admin/v1/") for u in requested), \
            requested
        assert not any(key in u for u in requested
                       for key in (b_key, admin.keys["platform"], admin.keys["a_user"]))
        thrown = [params for method, params, _ in browser.events
                  if method == "Runtime.exceptionThrown"]
        assert thrown == []


async def test_the_page_and_its_files_are_public_and_locked_to_their_origin(
        seeded: Seeded) -> None:
    base = seeded.admin.url + "/admin/v1/dashboard"
    async with aiohttp.ClientSession() as session:
        for path, content_type in (("", "text/html"), ("/dashboard.js", "text/javascript"),
                                   ("/uPlot.iife.min.js", "text/javascript"),
                                   ("/uPlot.min.css", "text/css")):
            async with session.get(base + path) as resp:
                assert resp.status == 200 and resp.content_type == content_type, path
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        async with session.get(base + "/secrets.txt") as resp:
            assert resp.status == 404
        # The usage data itself needs a key.
        async with session.get(seeded.admin.url + "/admin/v1/usage") as resp:
            assert resp.status == 401


def _call(asset: str = "") -> Call:
    return Call(plane=None, redis=None, metering=None, actor=None,  # type: ignore[arg-type]
                request_id="r", path={"asset": asset}, query={}, body=None)


async def test_a_missing_charting_library_is_a_clear_503(tmp_path: Path) -> None:
    handlers = dashboard_handlers(tmp_path)
    with pytest.raises(ServiceUnavailable, match="make deps"):
        await handlers["dashboard"](_call())
    with pytest.raises(ServiceUnavailable, match="uPlot"):
        await handlers["dashboard_asset"](_call("uPlot.iife.min.js"))
    # The page's own files do not depend on it; unknown names are not served.
    assert (await handlers["dashboard_asset"](_call("dashboard.js"))).status == 200
    with pytest.raises(RecordNotFound):
        await handlers["dashboard_asset"](_call("../admin_app.py"))
