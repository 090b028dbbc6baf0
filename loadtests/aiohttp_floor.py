"""aiohttp on uvloop with nothing of switchyard in it: the floor under the
ingress's CPU per request on this machine (bench_overhead `--floor`).

- `echo`: a server answering every POST with a fixed JSON body;
- `proxy`: a server relaying each POST, body and answer as they are, to
  `--upstream` through one pooled client session (aiohttp's server and
  client, the two halves of the ingress's own HTTP work).

    python -m loadtests.aiohttp_floor --mode echo|proxy --port P [--upstream URL]
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

ECHO_BODY = b'{"id":"x","object":"chat.completion","choices":[]}'


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ECHO_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    return app


def proxy_app(upstream_url: str) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[session_key].close()

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app[session_key].post(
                upstream_url, data=body, headers={"Content-Type": "application/json"}) as resp:
            answer = await resp.read()
        return web.Response(body=answer, status=resp.status, content_type="application/json")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", proxy)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("echo", "proxy"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args()
    app = echo_app() if args.mode == "echo" else proxy_app(args.upstream)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
