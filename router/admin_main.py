"""`python -m router.admin_main --config PATH`: the admin API process on uvloop."""

from __future__ import annotations

import uvloop
from aiohttp import web

from router.admin_app import create_admin_app
from scheduler.config import process_config


def main(argv: list[str] | None = None) -> int:
    cfg = process_config("python -m router.admin_main", argv)
    uvloop.install()
    web.run_app(create_admin_app(cfg), host=cfg.admin.host, port=cfg.admin.port,
                handler_cancellation=True, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
