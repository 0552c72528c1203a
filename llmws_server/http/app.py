"""The HTTP front end (server.http_port): Starlette on uvicorn in the server's own event loop, over the
same Service as the WebSocket front end: the same FIFO, limits and model. One module per API:

    http/openai.py      GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings
    http/responses.py   /v1/responses
    http/anthropic.py   POST /v1/messages, POST /v1/messages/count_tokens
    http/ollama.py      GET, HEAD /; /api/: version, tags, ps, show, chat, generate, embed, embeddings, pull, delete
    here                GET /health (the process answers), /ready (a model serves), /metrics

A new API is one module with a `routes(api)` function, and one line in APIS.
"""
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.access import origin_allowed, same_secret
from llmws_server.core.requests import parse_json
from llmws_server.core.service import Service
from llmws_server.errors import Busy, Refused
from llmws_server.http import anthropic, ollama, openai, responses
from llmws_server.http.doors import Doors
from llmws_server.http.errors import APIError
from llmws_server.listeners import ConnectionPolicy, guarded_http, raise_open_files_limit

log = logging.getLogger("llmws.http")
APIS = [openai, responses, anthropic, ollama]  # each gives its routes: routes(api) -> [Route]
Endpoint = Callable[[Request], Awaitable[Response]]
ErrorShape = Callable[[APIError], dict]  # an API's error body


class HTTPApi:
    def __init__(self, service: Service):
        self.service = service
        self.settings = service.config.server
        self.started = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.endpoint(self.health, guarded=False)),
            Route("/ready", self.endpoint(self.ready, guarded=False)),
            Route("/metrics", self.endpoint(self.metrics)),
            *(route for api in APIS for route in api.routes(self)),
        ], middleware=[Middleware(Doors, server=self.settings, limits=service.config.limits)])

    def endpoint(self, handler: Endpoint, guarded: bool = True, shape: ErrorShape = APIError.body) -> Endpoint:
        """The handler behind the origin and token checks, with every refusal in its API's error shape
        (OpenAI's unless told)."""
        async def run(request: Request) -> Response:
            try:
                if guarded:
                    self.check_access(request)
                return await handler(request)
            except Exception as exc:
                error = api_error(exc, request)
                return JSONResponse(shape(error), error.status, headers=error.headers)
        return run

    def check_access(self, request: Request) -> None:
        """Browsers only from allowed origins; with server.auth_token (or admin_token) set, its bearer token."""
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.settings["allowed_origins"]):
            raise APIError(f"Origin {origin} is not allowed", status=403, kind="permission_error")
        tokens = [token for token in (self.settings["auth_token"], self.settings["admin_token"]) if token]
        presented = request.headers.get("authorization", "").removeprefix("Bearer ") or request.headers.get(
            "x-api-key", "")  # Anthropic's clients send the key so
        if tokens and not any(same_secret(presented, token) for token in tokens):
            raise APIError("Missing or wrong API key: send Authorization: Bearer <server.auth_token> or x-api-key",
                           status=401, kind="authentication_error")

    async def body(self, request: Request) -> dict:
        """The JSON body, read no further than max_message_size, checked as a WebSocket frame is."""
        most, read = self.settings["max_message_size"], bytearray()
        async for piece in request.stream():
            read += piece
            if len(read) > most:
                raise APIError(f"Request body over {most} bytes (server.max_message_size)", status=413)
        try:
            return parse_json(read.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError("The request body must be UTF-8 JSON") from None
        except Refused as exc:  # malformed, too deep, or not Unicode text (naming the field)
            raise APIError(str(exc), exc.field) from None

    # -- the server's own endpoints ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ready = self.service.models.ready()
        return JSONResponse({"status": "ready" if ready else "not ready", "model": self.service.engine.name},
                            200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def api_error(exc: Exception, request: Request) -> APIError:
    """What any exception of a handler answers: a refusal its status, a bug a 500 with the incident the log
    names it by (logged whole)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Busy):
        return APIError(str(exc), status=429, kind="rate_limit_error")
    if isinstance(exc, Refused):  # the core's checks (a prompt too long, a bad image, ...)
        return APIError(str(exc), exc.field, **exc.fields)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    return APIError(f"Internal error (incident {incident}): the server's log has the details",
                    status=500, kind="server_error")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the server's event loop: llmws.py handles the signals and says when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(service: Service, host: str, port: int, ssl_files: tuple[str | None, str | None] = (None, None),
                policy: ConnectionPolicy | None = None) -> EmbeddedServer:
    """uvicorn serving the APIs; its connections counted and capped at accept under `policy` (the one the
    WebSocket port shares; without one, a policy of this port's own), each request's headers and body due
    within limits.hello_timeout_s."""
    certificate, key = ssl_files
    limits = service.config.limits
    policy = policy or ConnectionPolicy.from_limits(limits, raise_open_files_limit()[1])
    config = uvicorn.Config(HTTPApi(service).app, host=host, port=port, lifespan="off", log_config=None,
                            access_log=False, ssl_certfile=certificate, ssl_keyfile=key, ws="none",
                            http=guarded_http(policy, limits["hello_timeout_s"]))
    return EmbeddedServer(config)


