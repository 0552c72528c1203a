"""The OpenAI-compatible HTTP API (server.http_port), on Starlette and uvicorn in the server's own event
loop: its requests go through the same FIFO, limits and model as the WebSocket's.

    GET /v1/models, POST /v1/chat/completions, POST /v1/completions (stream or not)
    /v1/responses: see http_responses.py
    GET /health (the process answers), GET /ready (a model is loaded and the worker runs), GET /metrics
"""
import contextlib
import json
import logging
import time

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import openai_protocol, protocol
from .handshake import origin_allowed, same_secret
from .http_responses import ResponsesEndpoints
from .openai_protocol import APIError, Reply, StopText
from .sessions import RequestSession

log = logging.getLogger("llmws.http")
QUEUE_HEADER = "x-llmws-queue-position"  # requests ahead when this one had to wait


class HTTPApi:
    def __init__(self, server):
        self.server = server  # the LLMWSServer: its worker, limits, engine
        self.settings = server.config.server
        self.started = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.endpoint(self.health, guarded=False)),
            Route("/ready", self.endpoint(self.ready, guarded=False)),
            Route("/metrics", self.endpoint(self.metrics)),
            Route("/v1/models", self.endpoint(self.models)),
            Route("/v1/chat/completions", self.endpoint(self.chat), methods=["POST"]),
            Route("/v1/completions", self.endpoint(self.completions), methods=["POST"]),
            *ResponsesEndpoints(self).routes(),
        ])

    def endpoint(self, handler, guarded: bool = True):
        """The handler behind the origin and token checks, with every refusal in OpenAI's error shape."""
        async def run(request):
            try:
                if guarded:
                    self.check_access(request)
                return await handler(request)
            except APIError as exc:
                return JSONResponse(exc.body(), exc.status)
            except protocol.Busy as exc:
                return JSONResponse(APIError(str(exc), status=429, kind="rate_limit_error").body(), 429)
            except ValueError as exc:  # the server's checks (a prompt too long, a bad image, ...)
                fields = getattr(exc, "fields", {})
                return JSONResponse(APIError(str(exc), **fields).body(), 400)
        return run

    def check_access(self, request) -> None:
        """Browsers only from allowed origins; with server.auth_token (or admin_token) set, its bearer token."""
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.settings["allowed_origins"]):
            raise APIError(f"Origin {origin} is not allowed", status=403, kind="permission_error")
        tokens = [token for token in (self.settings["auth_token"], self.settings["admin_token"]) if token]
        presented = request.headers.get("authorization", "").removeprefix("Bearer ")
        if tokens and not any(same_secret(presented, token) for token in tokens):
            raise APIError("Missing or wrong API key: send Authorization: Bearer <server.auth_token>",
                           status=401, kind="authentication_error")

    async def body(self, request) -> dict:
        """The JSON body, read no further than max_message_size, checked as a WebSocket frame is."""
        most, read = self.settings["max_message_size"], bytearray()
        async for piece in request.stream():
            read += piece
            if len(read) > most:
                raise APIError(f"Request body over {most} bytes (server.max_message_size)", status=413)
        try:
            return protocol.parse_frame(read.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError("The request body must be UTF-8 JSON") from None
        except protocol.ProtocolError as exc:
            raise APIError(str(exc)) from None

    # -- endpoints -----------------------------------------------------------------------------------------

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def ready(self, request):
        worker = self.server.worker  # not ready while a model switch unloads and loads
        ready = worker.thread.is_alive() and not worker.stopping and self.server.model_status()["status"] == "OK"
        return JSONResponse({"status": "ready" if ready else "not ready", "model": self.server.engine.name},
                            200 if ready else 503)

    async def metrics(self, request):
        return Response(self.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        return JSONResponse(openai_protocol.models_list([self.server.engine.name], self.started))

    async def chat(self, request):
        defaults = self.server.generation_defaults
        return await self.answer(openai_protocol.chat_request(await self.body(request), defaults), chat=True)

    async def completions(self, request):
        defaults = self.server.generation_defaults
        return await self.answer(openai_protocol.completion_request(await self.body(request), defaults), chat=False)

    # -- answering -----------------------------------------------------------------------------------------

    async def answer(self, api, chat: bool):
        session = RequestSession()
        job = await self.server.submit(session, api.inference)
        reply = Reply(chat, self.server.engine.name)
        first = await session.messages.get()
        headers = {QUEUE_HEADER: str(first["position"])} if first["type"] == "queued" else {}
        if first["type"] == "error":  # refused before it started: a proper status, not a stream
            raise _refusal(first)
        events = self.events(job, session, first, api.stop)
        if api.stream:
            return EventSourceResponse(self.chunks(events, reply, api.include_usage), headers=headers,
                                       ping=15, sep="\n")
        return await self.whole(events, reply, headers)

    async def events(self, job, session, message, stops):
        """What the worker says about one request, as (kind, value): queued, text, done (reason, usage),
        error. A stop string ends the text there and cancels the rest; a client that leaves cancels it all."""
        stop, tokens_in, finished = StopText(stops), 0, False
        try:
            while True:
                kind = message["type"]
                if kind == "queued":
                    yield "queued", message["position"]
                elif kind == "start":
                    tokens_in = message["tokens_in"]
                elif kind == "token" and not stop.stopped:
                    text = stop.feed(message["data"])
                    if stop.stopped:
                        job.cancelled.set()
                    if text:
                        yield "text", text
                elif kind == "done":
                    finished = True
                    rest = stop.rest()
                    if rest:
                        yield "text", rest
                    reason = "stop" if stop.stopped else message["finish_reason"]
                    yield "done", (reason, openai_protocol.usage(tokens_in, message["total_tokens"]))
                    return
                elif kind == "error":
                    finished = True
                    yield "error", message
                    return
                message = await session.messages.get()
        finally:
            if not finished:
                log.info("request %s cancelled: its HTTP client left", job.request_id)
                self.server.cancel_job(session, job)

    async def whole(self, events, reply: Reply, headers: dict):
        text = []
        async for kind, value in events:
            if kind == "text":
                text.append(value)
            elif kind == "done":
                reason, usage = value
                return JSONResponse(reply.whole("".join(text), reason, usage), headers=headers)
            elif kind == "error":
                error = _refusal(value)
                return JSONResponse(error.body(), error.status, headers=headers)

    async def chunks(self, events, reply: Reply, include_usage: bool):
        """The stream: chunks as data events, queue positions as comments, then [DONE]."""
        if reply.chat:
            yield _data(reply.chunk(first=True))
        async for kind, value in events:
            if kind == "queued":
                yield ServerSentEvent(comment=f"queued: {value} ahead")
            elif kind == "text":
                yield _data(reply.chunk(value))
            elif kind == "done":
                reason, usage = value
                yield _data(reply.chunk(reason=reason))
                if include_usage:
                    yield _data(reply.usage_chunk(usage))
            elif kind == "error":
                yield _data(_refusal(value).body())
        yield ServerSentEvent(data="[DONE]")


def _data(shape: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(shape, ensure_ascii=False))


def _refusal(error: dict) -> APIError:
    """A worker's error message as an API error: too long a prompt is the client's (400), the rest the server's."""
    fields = {key: value for key, value in error.items() if key not in ("type", "message", "request_id", "seq")}
    if "max_context" in fields:
        return APIError(error["message"], "messages", **fields)
    return APIError(error["message"], status=500, kind="server_error")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the server's event loop: llmws.py handles the signals and says when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_server(server, host: str, port: int, ssl_files: tuple = (None, None)) -> EmbeddedServer:
    certificate, key = ssl_files
    config = uvicorn.Config(HTTPApi(server).app, host=host, port=port, lifespan="off", log_config=None,
                            access_log=False, ssl_certfile=certificate, ssl_keyfile=key)
    return EmbeddedServer(config)
