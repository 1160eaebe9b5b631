"""The gateway's HTTP server: Starlette routes served by uvicorn in a background thread.

Routes (all but `/health` need `Authorization: Bearer <token>`; 401 without it):

| route | what |
| --- | --- |
| `GET /health` | `{"status": "ok"}` |
| `POST /rollouts/{id}/v1/chat/completions`, `POST /v1/chat/completions` + `X-Turnstile-Rollout-Id` | a model call |
| `POST /rollouts/{id}/v1/completions`, `POST /v1/completions` + the header | a model call on a raw prompt |
| `GET /rollouts/{id}/v1/models`, `GET /v1/models` | the served model (`policy`) |
| `POST /rollouts/{id}/complete` | the agent finished (`ready`) or gave up (`failed`, with a reason) |
| `POST /rollouts/{id}/reward` | the episode's reward, or one per call, and named components |
| `POST /rollouts/next` | pull form: the next rollout to play (200), or none now (204) |
| `GET /rollouts/{id}` | where the rollout stands |

Errors are OpenAI error objects (`protocol.GatewayError`): 400 for a malformed body (the field named),
401, 404 for an unknown rollout, 409 for a call on a finished rollout, 413 above
`rollout.agent.max_request_bytes`. A path's rollout id and the header's must agree (400), so a call can only
write into the rollout it names. The handlers are the `GatewayHandlers` methods (rl_core/gateway/collection.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rl_core.gateway.protocol import GatewayError, parse_json

log = logging.getLogger(__name__)

ROLLOUT_HEADER = "X-Turnstile-Rollout-Id"


class GatewayHandlers(Protocol):
    """What the routes call (rl_core/gateway/collection.py implements it). Each takes the rollout id and the
    decoded JSON body, returns the response body (a dict, or a list of stream events for a streamed call)
    or raises GatewayError."""

    def chat(self, rollout_id: str, body: Any) -> Awaitable[tuple[dict[str, Any], list[dict[str, Any]] | None]]: ...
    def completion(
        self, rollout_id: str, body: Any
    ) -> Awaitable[tuple[dict[str, Any], list[dict[str, Any]] | None]]: ...
    def complete(self, rollout_id: str, body: Any, idempotency_key: str | None) -> dict[str, Any]: ...
    def reward(self, rollout_id: str, body: Any, idempotency_key: str | None) -> dict[str, Any]: ...
    def next_rollout(self) -> dict[str, Any] | None: ...
    def status(self, rollout_id: str) -> dict[str, Any]: ...
    def check_rollout(self, rollout_id: str) -> None: ...


def _error(err: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_app(handlers: GatewayHandlers, token: str, max_request_bytes: int, model_name: str) -> Starlette:
    """The gateway's Starlette application (routes in the module docstring)."""

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise GatewayError(
                401, "missing or wrong bearer token (Authorization: Bearer <token>)", code="unauthorized"
            )

    async def body_of(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise GatewayError(413, f"the request body is larger than {max_request_bytes} bytes", code="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise GatewayError(413, f"the request body is larger than {max_request_bytes} bytes", code="too_large")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def rollout_of(request: Request) -> str:
        in_path = request.path_params.get("rollout_id")
        in_header = request.headers.get(ROLLOUT_HEADER)
        if in_path and in_header and in_path != in_header:
            raise GatewayError(
                400,
                f"the path names rollout {in_path!r} but {ROLLOUT_HEADER} names {in_header!r}",
                param=ROLLOUT_HEADER,
            )
        rollout_id = in_path or in_header
        if not rollout_id:
            raise GatewayError(
                400,
                f"no rollout named: use the rollout's base URL (/rollouts/<id>/v1) or the {ROLLOUT_HEADER} header",
                param=ROLLOUT_HEADER,
            )
        return rollout_id

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                authorize(request)
                return await handler(request)
            except GatewayError as err:
                return _error(err)
            except Exception as exc:  # a bug must answer 500, never drop the connection silently
                log.exception("gateway: %s %s failed", request.method, request.url.path)
                return _error(GatewayError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal"))

        return run

    def streamed(events: list[dict[str, Any]]) -> StreamingResponse:
        async def lines():
            for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        rollout_id = rollout_of(request)
        handlers.check_rollout(rollout_id)
        body, events = await handlers.chat(rollout_id, await body_of(request))
        return streamed(events) if events is not None else JSONResponse(body)

    async def completion(request: Request) -> Response:
        rollout_id = rollout_of(request)
        handlers.check_rollout(rollout_id)
        body, events = await handlers.completion(rollout_id, await body_of(request))
        return streamed(events) if events is not None else JSONResponse(body)

    async def models(request: Request) -> Response:
        if request.path_params.get("rollout_id"):
            handlers.check_rollout(request.path_params["rollout_id"])
        return JSONResponse(
            {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "turnstile", "created": 0}]}
        )

    def idempotency(request: Request) -> str | None:
        return request.headers.get("idempotency-key")

    async def complete(request: Request) -> Response:
        rollout_id = rollout_of(request)
        body = await body_of(request)
        return JSONResponse(handlers.complete(rollout_id, body, idempotency(request)))

    async def reward(request: Request) -> Response:
        rollout_id = rollout_of(request)
        body = await body_of(request)
        return JSONResponse(handlers.reward(rollout_id, body, idempotency(request)))

    async def next_rollout(request: Request) -> Response:
        found = handlers.next_rollout()
        return JSONResponse(found) if found is not None else Response(status_code=204)

    async def status(request: Request) -> Response:
        return JSONResponse(handlers.status(rollout_of(request)))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/rollouts/next", guarded(next_rollout), methods=["POST"]),
        Route("/rollouts/{rollout_id}/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/rollouts/{rollout_id}/v1/completions", guarded(completion), methods=["POST"]),
        Route("/rollouts/{rollout_id}/v1/models", guarded(models), methods=["GET"]),
        Route("/rollouts/{rollout_id}/complete", guarded(complete), methods=["POST"]),
        Route("/rollouts/{rollout_id}/reward", guarded(reward), methods=["POST"]),
        Route("/rollouts/{rollout_id}", guarded(status), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completion), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        what = {404: "no such route", 405: "method not allowed on this route"}.get(status, "request refused")
        return _error(GatewayError(status, f"{what}: {request.method} {request.url.path}", code="no_route"))

    return Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error})


class ServerThread:
    """uvicorn serving `app` on (`host`, `port`) in a daemon thread with its own event loop.

    `start()` returns once the socket listens (`port` 0 takes a free port; `.port` tells which) and raises
    OSError when it cannot bind; `stop()` shuts it down. `loop` is the server's event loop (for futures
    resolved from other threads)."""

    def __init__(self, app: Starlette, host: str, port: int):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.serve())
            except BaseException as exc:  # bind errors end serve() with SystemExit
                self._failed = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="turnstile-gateway", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started and self._thread.is_alive() and waited < timeout_s:
            ready.wait(0.02)
            waited += 0.02
        if not self.server.started:
            raise OSError(f"the rollout gateway could not listen on {self.host}:{self.port}: {self._failed!r}")
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
