"""The ``/_mock/*`` routes that let tests and benchmarks inspect and steer the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._faults import parse_fail_next
from ._replies import dumps, error_body, load_object

if TYPE_CHECKING:
    from .mock_server import MockServer


def add_control_routes(app: web.Application, server: MockServer) -> None:
    """Mount stats, reset, config and fail_next under ``/_mock/`` on ``app``."""

    async def get_stats(request: web.Request) -> web.Response:
        return _json(server.stats())

    async def post_reset(request: web.Request) -> web.Response:
        server.reset()
        return _json(server.stats())

    async def get_config(request: web.Request) -> web.Response:
        return _json(server.config.to_dict())

    async def post_config(request: web.Request) -> web.Response:
        try:
            server.set_config(server.config.merge(load_object(await request.read())))
        except ValueError as exc:  # RequestError is one too; both carry the reason as str
            return _bad_request(str(exc))
        return _json(server.config.to_dict())

    async def post_fail_next(request: web.Request) -> web.Response:
        try:
            fault, count = parse_fail_next(load_object(await request.read()))
        except ValueError as exc:
            return _bad_request(str(exc))
        return _json({"pending": server.queue_fault(fault, count)})

    app.router.add_get("/_mock/stats", get_stats)
    app.router.add_post("/_mock/reset", post_reset)
    app.router.add_get("/_mock/config", get_config)
    app.router.add_post("/_mock/config", post_config)
    app.router.add_post("/_mock/fail_next", post_fail_next)


def _json(obj: Any) -> web.Response:
    return web.Response(body=dumps(obj), content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return web.Response(status=400, body=error_body(message), content_type="application/json")
