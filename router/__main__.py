"""`python -m router --config PATH`: one ingress process on uvloop."""

from __future__ import annotations

import uvloop
from aiohttp import web

from router.app import create_app
from scheduler.config import process_config


def main(argv: list[str] | None = None) -> int:
    cfg = process_config("python -m router", argv)
    uvloop.install()
    web.run_app(create_app(cfg), host=cfg.ingress.host, port=cfg.ingress.port,
                handler_cancellation=True, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
