"""`python -m router --config PATH`: one ingress process on uvloop."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvloop
from aiohttp import web

from router.app import create_app
from scheduler.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router")
    parser.add_argument("--config", type=Path, help="TOML file, or JSON written by `up`")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.install()
    web.run_app(create_app(cfg), host=cfg.ingress.host, port=cfg.ingress.port,
                handler_cancellation=True, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
