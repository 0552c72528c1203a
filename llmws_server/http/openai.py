"""OpenAI's chat completions and completions (http/openai_shapes.py has their request checks and shapes):
a request goes to the core as a StreamSession of its own, and its events come back as chunks or whole."""
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.core.events import Done, Failed, FinishReason, Queued, Stamped, Started, Text
from llmws_server.core.jobs import InferenceJob
from llmws_server.http import openai_shapes
from llmws_server.http.errors import APIError
from llmws_server.http.openai_shapes import APIRequest, Reply, StopText
from llmws_server.sessions.store import StreamSession

if TYPE_CHECKING:
    from llmws_server.http.app import HTTPApi

log = logging.getLogger("llmws.http")
QUEUE_HEADER = "x-llmws-queue-position"  # requests ahead when this one had to wait


def routes(api: "HTTPApi") -> list[Route]:
    endpoints = OpenAIEndpoints(api)
    return [Route("/v1/models", api.endpoint(endpoints.models)),
            Route("/v1/chat/completions", api.endpoint(endpoints.chat), methods=["POST"]),
            Route("/v1/completions", api.endpoint(endpoints.completions), methods=["POST"])]


def refusal(failed: Failed) -> APIError:
    """A job's failure as an API error: too long a prompt is the client's (400), the rest the server's."""
    if "max_context" in failed.fields:
        return APIError(failed.message, "messages", **failed.fields)
    return APIError(failed.message, status=500, kind="server_error")


class OpenAIEndpoints:
    def __init__(self, api: "HTTPApi"):
        self.api, self.service = api, api.service

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai_shapes.models_list([self.service.engine.name], self.api.started))

    async def chat(self, request: Request) -> Response:
        defaults = self.service.generation_defaults
        return await self.answer(openai_shapes.chat_request(await self.api.body(request), defaults), chat=True)

    async def completions(self, request: Request) -> Response:
        defaults = self.service.generation_defaults
        return await self.answer(openai_shapes.completion_request(await self.api.body(request), defaults), chat=False)

    async def answer(self, wanted: APIRequest, chat: bool) -> Response:
        session = StreamSession()
        job = await self.service.submit(session, wanted.inference)
        reply = Reply(chat, self.service.engine.name)
        first = await session.events.get()
        headers = {QUEUE_HEADER: str(first.event.position)} if isinstance(first.event, Queued) else {}
        if isinstance(first.event, Failed):  # refused before it started: a proper status, not a stream
            raise refusal(first.event)
        events = self.events(job, session, first, wanted.stop)
        if wanted.stream:
            return EventSourceResponse(self.chunks(events, reply, wanted.include_usage), headers=headers,
                                       ping=15, sep="\n")
        return await self.whole(events, reply, headers)

    async def events(self, job: InferenceJob, session: StreamSession, stamped: Stamped,
                     stops: tuple[str, ...]) -> AsyncIterator[tuple[str, Any]]:
        """A request's events as (kind, value): queued, text, done (reason, usage), error. A stop string
        ends the text there and cancels the rest; a client that leaves cancels it all."""
        stop, tokens_in, finished = StopText(stops), 0, False
        try:
            while True:
                event = stamped.event
                if isinstance(event, Queued):
                    yield "queued", event.position
                elif isinstance(event, Started):
                    tokens_in = event.tokens_in
                elif isinstance(event, Text) and not stop.stopped:
                    text = stop.feed(event.text)
                    if stop.stopped:
                        job.cancelled.set()
                    if text:
                        yield "text", text
                elif isinstance(event, Done):
                    finished = True
                    rest = stop.rest()
                    if rest:
                        yield "text", rest
                    reason = FinishReason.STOP if stop.stopped else event.reason
                    yield "done", (reason, openai_shapes.usage(tokens_in, event.tokens))
                    return
                elif isinstance(event, Failed):
                    finished = True
                    yield "error", event
                    return
                stamped = await session.events.get()
        finally:
            if not finished:
                log.info("request %s cancelled: its HTTP client left", job.request_id)
                self.service.cancel(session, job)

    async def whole(self, events: AsyncIterator[tuple[str, Any]], reply: Reply, headers: dict) -> Response:
        text = []
        async for kind, value in events:
            if kind == "text":
                text.append(value)
            elif kind == "done":
                reason, usage = value
                return JSONResponse(reply.whole("".join(text), reason, usage), headers=headers)
            elif kind == "error":
                error = refusal(value)
                return JSONResponse(error.body(), error.status, headers=headers)
        raise AssertionError("a request's events end with done or error")

    async def chunks(self, events: AsyncIterator[tuple[str, Any]], reply: Reply,
                     include_usage: bool) -> AsyncIterator[ServerSentEvent]:
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
                yield _data(refusal(value).body())
        yield ServerSentEvent(data="[DONE]")


def _data(shape: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(shape, ensure_ascii=False))
