"""A bare aiohttp relay: what any gateway on aiohttp's server and client costs at the least.

``python -m benchmarks._relay UPSTREAM_URL`` listens on a free port and passes every
``POST /v1/chat/completions`` to ``UPSTREAM_URL`` as it is, streams included, with no
cache, checks, metrics or log. The gateway benchmarks measure it beside the gateway, so
the report shows how much of the gateway's cost is the HTTP stack the gateway is built on.
"""

from __future__ import annotations

import socket
import sys

import aiohttp
from aiohttp import web

_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def _relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[_SESSION]
    headers = {"Content-Type": "application/json"}
    async with session.post(request.app["upstream"], data=body, headers=headers) as upstream:
        if upstream.content_type != "text/event-stream":
            data = await upstream.read()
            return web.Response(body=data, status=upstream.status, content_type="application/json")
        resp = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": "text/event-stream"}
        )
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _session(app: web.Application) -> None:
    app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))


async def _close(app: web.Application) -> None:
    await app[_SESSION].close()


def make_app(upstream: str) -> web.Application:
    """The relay's app, passing ``/v1/chat/completions`` on to ``upstream`` (a ``.../v1`` URL)."""
    app = web.Application()
    app["upstream"] = upstream.rstrip("/") + "/chat/completions"
    app.on_startup.append(_session)
    app.on_cleanup.append(_close)
    app.router.add_post("/v1/chat/completions", _relay)
    return app


def main() -> None:
    """Serve the relay in front of ``sys.argv[1]`` until terminated."""
    app = make_app(sys.argv[1])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    print(f"relay listening on http://127.0.0.1:{port}/v1", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
