"""The house layering: scheduler/ is a pure core (standard library and
msgspec only); nothing outside router/ imports router, except the replica
simulator, which tokenizes prompts with the ingress's own implementation,
and the benchmarks of that and of the ingress's quota client; each module imports on its own.
And no test opens a NATS or Redis client that stays open when the test fails."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("scheduler", "router", "actors", "analytics", "deploy", "loadtests")
IMPURE = ("asyncio", "aiohttp", "ray", "nats", "redis", "clickhouse_connect", "chdb", "uvloop",
          "prometheus_client")
MAX_MODULE_LINES = 400
# Who outside router/ may import which router modules.
ROUTER_IMPORTS_ALLOWED = {
    ROOT / "loadtests" / "simulator": {"router.prompt_tokens"},
    ROOT / "loadtests" / "bench_prompt_hashing.py": {
        "router.prompt_tokens", "router.prompt_blocks", "router.requests"},
    ROOT / "loadtests" / "bench_quota.py": {"router.quota_client"},
    ROOT / "loadtests" / "bench_quota_timeout.py": {"router.quota_client"},
}


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                  for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py")


def module_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", _modules("scheduler"))
def test_scheduler_core_is_pure(module: str) -> None:
    probe = (f"import sys, {module}; "
             f"print(','.join(m for m in {IMPURE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "", f"{module} pulls in {out}"


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "router"])
def test_nothing_imports_router(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        allowed = set().union(*(modules for where, modules in ROUTER_IMPORTS_ALLOWED.items()
                                if path.is_relative_to(where)))
        assert not any((m == "router" or m.startswith("router.")) and m not in allowed
                       for m in module_imports(path)), path


@pytest.mark.parametrize("module", [m for p in PACKAGES for m in _modules(p)
                                    if not m.endswith("__main__")])
def test_each_module_imports_on_its_own(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, path


def _opens_client(call: ast.Call) -> bool:
    """nats.connect(...), connect_redis(...) or <...>Redis.from_url(...)."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id == "connect_redis"
    if not isinstance(func, ast.Attribute):
        return False
    owner = ast.unparse(func.value)
    return ((func.attr, owner) == ("connect", "nats") or func.attr == "connect_redis"
            or (func.attr == "from_url" and owner.endswith("Redis")))


def unclosed_client_lines(path: Path) -> list[int]:
    """Lines that open a client other than as an `async with` item, as the
    argument of `enter_async_context`, in a fixture (its teardown runs
    whatever the test does) or in harness.nats_client itself."""
    tree = ast.parse(path.read_text())
    closed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncWith):
            closed.update(id(item.context_expr) for item in node.items)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "enter_async_context"):
            closed.update(id(arg) for arg in node.args)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                any("fixture" in ast.unparse(d) for d in node.decorator_list)
                or (path.name, node.name) == ("harness.py", "nats_client")):
            closed.update(id(inner) for inner in ast.walk(node))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and _opens_client(node) and id(node) not in closed]


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda p: p.name)
def test_test_clients_are_closed_when_a_test_fails(path: Path) -> None:
    # A client closed only at the end of a test body stays open when an
    # assertion fails: a NATS client then reconnects for minutes, and the
    # warnings of both surface in whichever tests run next.
    assert unclosed_client_lines(path) == [], (
        f"{path.name}: open these clients with `async with` (tests.harness.nats_client, "
        "connect_redis(...) as redis) or in a fixture")
