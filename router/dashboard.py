"""The usage dashboard, served by the admin API: the page and its script and
styles (router/static/), and the charting library, uPlot, from var/static/
where `make deps` unpacked the pinned npm tarball (deploy/static_assets.py).

They are public operations: they hold no data. The page asks for an admin
key, keeps it in sessionStorage, and sends it as a Bearer header on its data
calls (the usage operation), which are authorized like any other. A strict
Content-Security-Policy keeps the page to its own origin: no inline script,
no CDN, no calls elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from deploy.static_assets import UPLOT_VERSION, VENDOR_DIR
from router.admin_handlers import Call, Handler
from scheduler.errors import RecordNotFound, ServiceUnavailable

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
OWN_ASSETS = ("dashboard.js", "dashboard.css")
VENDOR_ASSETS = ("uPlot.iife.min.js", "uPlot.min.css")
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files; a stale script after an upgrade would be worse than a refetch.
    "Cache-Control": "no-cache",
}


# By suffix, not the host's mimetypes table (which may say application/javascript).
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}


def _file(path: Path) -> web.FileResponse:
    return web.FileResponse(path, headers={**HEADERS, "Content-Type": CONTENT_TYPES[path.suffix]})


def missing_vendor_files(vendor_dir: Path) -> list[str]:
    return [name for name in VENDOR_ASSETS if not (vendor_dir / name).is_file()]


def dashboard_handlers(vendor_dir: Path = VENDOR_DIR) -> dict[str, Handler]:
    """The two operations' handlers; `vendor_dir` holds uPlot's files."""

    def check_vendor() -> None:
        missing = missing_vendor_files(vendor_dir)
        if missing:
            raise ServiceUnavailable(
                f"The dashboard's charting library (uPlot {UPLOT_VERSION}) is not installed: "
                f"{', '.join(missing)} missing from {vendor_dir}. Run `make deps`, which "
                "fetches it from the npm registry and unpacks it there.")

    async def dashboard(call: Call) -> web.FileResponse:
        check_vendor()
        return _file(STATIC_DIR / PAGE)

    async def dashboard_asset(call: Call) -> web.FileResponse:
        asset = call.path["asset"]
        if asset in OWN_ASSETS:
            return _file(STATIC_DIR / asset)
        if asset in VENDOR_ASSETS:
            check_vendor()
            return _file(vendor_dir / asset)
        raise RecordNotFound(f"The dashboard has no file {asset!r}.")

    return {"dashboard": dashboard, "dashboard_asset": dashboard_asset}
