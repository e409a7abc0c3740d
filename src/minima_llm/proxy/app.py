"""The aiohttp application: one middleware for metrics, auth and error shaping, then the routes."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..backend import OpenAIMinimaLlm
from ..config import is_header_safe
from .errors import ClientLeft, RequestError, error_response
from .gateway import Gateway
from .handlers import CLIENT_KEY, GATEWAY, INFERENCE_ROUTES, REQUEST_ID, TENANT, add_routes
from .log import ProxyLog, quiet_malformed_requests
from .metrics import GatewayMetrics
from .settings import ProxySettings

log = logging.getLogger("minima_llm.proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = frozenset({"/health"})


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics, auth and OpenAI-shaped errors around every route.

    One layer, not three: each middleware costs a coroutine and a call per request.
    """
    gw = request.app[GATEWAY]
    request[REQUEST_ID] = gw.request_ids.of(request)
    started = time.monotonic()
    task = asyncio.current_task()
    if task is not None:
        gw.answering.add(task)
    status = 500
    try:
        resp = await _shaped(request, handler, gw, started)
        status = resp.status
        return resp
    finally:
        gw.answering.discard(task)
        resource = request.match_info.route.resource
        if resource is not None:
            route = resource.canonical
        elif _is_preflight(request, gw):
            route = "preflight"  # a browser asking, not a call of the route
        elif request.rel_url.raw_path in gw.route_paths:
            # A route asked with the wrong method (405); as the router saw it, still
            # encoded: /v1/chat%2Fcompletions is no route.
            route = request.rel_url.raw_path
        else:
            route = "unmatched"
        gw.metrics.count_request(route, status)
        if gw.log.verbose and status < 400 and route not in INFERENCE_ROUTES:
            # Model calls log their own lines; with --verbose every other request has one too.
            gw.log.served(
                request.method,
                request.path,
                status,
                time.monotonic() - started,
                request[REQUEST_ID],
            )


async def _shaped(
    request: web.Request, handler: Handler, gw: Gateway, started: float
) -> web.StreamResponse:
    """Auth, then the handler; every error as OpenAI-shaped JSON, never a stack trace."""
    try:
        if _is_preflight(request, gw):
            # A browser's preflight carries no key: it asks whether it may send one.
            return _preflight(request, gw, started)
        refused = _authenticate(request, gw)
        if refused is not None:
            return _rejected(request, gw, started, *refused)
        return await handler(request)
    except RequestError as exc:
        resp = error_response(exc.status, str(exc), exc.param, exc.code)
        if exc.close or isinstance(exc.__cause__, web.RequestPayloadError):
            # The body was not read to its end: the connection cannot carry another
            # request, so say so (Connection: close) rather than reset the client's next one.
            resp.force_close()
        return _rejected(request, gw, started, resp, str(exc))
    except ClientLeft:
        # Nobody is there to answer: counted apart from the gateway's own errors.
        gw.metrics.client_disconnects += 1
        log.debug("client left %s %s before its request was read", request.method, request.path)
        return error_response(499, "client closed the request")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        code = "not_found" if exc.status == 404 else None
        resp = error_response(
            exc.status, f"{message} ({request.method} {request.path})", code=code, headers=headers
        )
        return _rejected(request, gw, started, resp, message)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error answering %s %s", request.method, request.path)
        return error_response(
            500, "internal error in the gateway; see its log", kind="server_error"
        )


def _rejected(
    request: web.Request, gw: Gateway, started: float, resp: web.Response, reason: str
) -> web.Response:
    """Log a request the gateway refused itself; ``resp``, its answer."""
    gw.log.rejected_request(
        request.method,
        request.path,
        resp.status,
        time.monotonic() - started,
        reason,
        request[REQUEST_ID],
    )
    return resp


def _authenticate(request: web.Request, gw: Gateway) -> tuple[web.Response, str] | None:
    """A 401 and the reason to log, unless the request carries one of the configured keys.

    Remembers the caller's key for the handler. The reason never quotes the key.
    """
    settings = gw.settings
    presented = _presented_key(request)
    if settings.auth_enabled and request.path not in _OPEN_PATHS:
        if not presented:
            return error_response(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            ), "no API key"
        if not gw.key_is_valid(presented):
            wrong = error_response(401, "Incorrect API key provided.", code="invalid_api_key")
            return wrong, "wrong API key"
    if presented:
        if settings.pass_through_client_key and not is_header_safe(presented):
            # It would go upstream in a header, which no transport can send as it is.
            wrong = error_response(401, "Incorrect API key provided.", code="invalid_api_key")
            return wrong, "API key not sendable upstream"
        request[CLIENT_KEY] = presented
        # A key passed through is the upstream's to judge: a shared cache would hand
        # answers to a caller whose key the upstream never saw (or would refuse), so
        # every passed-through key gets a partition of its own.
        if settings.partition_cache_by_key or settings.pass_through_client_key:
            request[TENANT] = gw.tenant_of(presented)
    return None


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key") or None


async def _stamp_request_id(request: web.Request, resp: web.StreamResponse) -> None:
    """Every answer names its request: ``x-minima-request-id``, and ``x-request-id`` unless set.

    Run as headers go out, so streams and answers sent in slices carry it too. A live
    answer already holds the upstream's ``x-request-id``, the one its provider knows.
    """
    rid = request.get(REQUEST_ID)
    if rid is None:  # not through the middleware (none such today): nothing to name
        return
    headers = resp.headers
    headers["x-minima-request-id"] = rid
    if "x-request-id" not in headers:
        headers["x-request-id"] = rid


# What a page may read of an answer besides the basic headers: whether it was a hit,
# the ids to quote, and how long to wait after a refusal.
_CORS_EXPOSED = "x-minima-cache, x-minima-request-id, x-request-id, Retry-After"
# Request headers a page may send, when its preflight names none: what OpenAI's SDKs send.
_CORS_HEADERS = "Authorization, Content-Type, Cache-Control, x-api-key, api-key"
_CORS_MAX_AGE_S = "600"
# A preflight's Access-Control-Request-Headers, echoed back only if it is header names.
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _is_preflight(request: web.Request, gw: Gateway) -> bool:
    """Whether the gateway answers ``request`` as a CORS preflight (CORS on, method OPTIONS)."""
    return request.method == "OPTIONS" and bool(gw.settings.cors_origins)


def _allowed_origin(request: web.BaseRequest, origins: tuple[str, ...]) -> str | None:
    """The Access-Control-Allow-Origin to answer ``request`` with; None if its page may not call."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if "*" in origins:
        return "*"
    return origin if origin.lower() in origins else None


def _preflight(request: web.Request, gw: Gateway, started: float) -> web.Response:
    """Answer a CORS preflight: which origin, methods and headers the page may use."""
    origin = _allowed_origin(request, gw.settings.cors_origins)
    if origin is None or "Access-Control-Request-Method" not in request.headers:
        resp = error_response(
            403,
            "this origin may not call the gateway (proxy.cors_origins)"
            if origin is None
            else "OPTIONS is only answered as a CORS preflight",
        )
        # The origin is what an operator needs to mend the setting (escaped by the log).
        origin_sent = request.headers.get("Origin", "none")
        return _rejected(request, gw, started, resp, f"CORS preflight from {origin_sent} refused")
    asked = request.headers.get("Access-Control-Request-Headers", "")
    # Echoed only when it is a plain list of header names: it goes back as a header.
    allowed = asked if _HEADER_LIST.fullmatch(asked) else _CORS_HEADERS
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": allowed,
        "Access-Control-Max-Age": _CORS_MAX_AGE_S,
    }
    if origin != "*":
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


def _cors_headers(
    origins: tuple[str, ...],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The response hook that lets allowed pages read answers (registered only with CORS on)."""

    anyone = "*" in origins

    async def stamp(request: web.Request, resp: web.StreamResponse) -> None:
        headers = resp.headers
        if "Access-Control-Allow-Origin" in headers:
            return  # a preflight's own answer
        if anyone:
            # The same for every request, with an Origin or without: nothing to vary on.
            headers["Access-Control-Allow-Origin"] = "*"
            headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
            return
        # Sent whether this origin is granted or not: the answer depends on it, and a
        # cache in between must not hand one origin's answer to another.
        headers.add("Vary", "Origin")
        origin = _allowed_origin(request, origins)
        if origin is not None:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED

    return stamp


def build_app(
    backend: OpenAIMinimaLlm,
    settings: ProxySettings | None = None,
    metrics: GatewayMetrics | None = None,
    proxy_log: ProxyLog | None = None,
) -> web.Application:
    """The gateway app in front of ``backend``; closing the app closes the backend."""
    settings = settings or ProxySettings()
    gateway = Gateway(backend, settings, metrics, proxy_log)
    quiet_malformed_requests(logging.getLogger("aiohttp.server"))
    app = web.Application(
        middlewares=[gateway_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[GATEWAY] = gateway
    add_routes(app)
    # Fixed paths only: a label per path a scanner makes up would grow without bound.
    gateway.route_paths = frozenset(
        r.canonical for r in app.router.resources() if "{" not in r.canonical
    )

    async def close(_: web.Application) -> None:
        await gateway.aclose()

    app.on_response_prepare.append(_stamp_request_id)
    if settings.cors_origins:
        app.on_response_prepare.append(_cors_headers(settings.cors_origins))
    app.on_cleanup.append(close)
    return app
