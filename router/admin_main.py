"""`python -m router.admin_main --config PATH`: the admin API process on uvloop."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvloop
from aiohttp import web

from router.admin_app import create_admin_app
from scheduler.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.admin_main")
    parser.add_argument("--config", type=Path, help="TOML file, or JSON written by `up`")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.install()
    web.run_app(create_admin_app(cfg), host=cfg.admin.host, port=cfg.admin.port,
                handler_cancellation=True, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
