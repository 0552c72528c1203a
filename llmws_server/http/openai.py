"""OpenAI's chat completions and completions (http/openai_shapes.py has their request checks and shapes):
a request goes to the core as a StreamSession of its own, and its events come back as chunks or whole."""
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

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


@dataclass(frozen=True)
class Finished:
    """The end of an answer as OpenAI tells it: a stop string's cut is a stop, and the usage."""
    reason: FinishReason
    usage: dict


Told = Union[Queued, Text, Finished, Failed]  # what an answer's stream tells, in order


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
                     stops: tuple[str, ...]) -> AsyncIterator[Told]:
        """A request's events as OpenAI tells them: queue positions, text, then finished or failed. A stop
        string ends the text there and cancels the rest; a client that leaves cancels it all."""
        stop, tokens_in, finished = StopText(stops), 0, False
        try:
            while True:
                event = stamped.event
                if isinstance(event, Queued):
                    yield event
                elif isinstance(event, Started):
                    tokens_in = event.tokens_in
                elif isinstance(event, Text) and not stop.stopped:
                    text = stop.feed(event.text)
                    if stop.stopped:
                        job.cancelled.set()
                    if text:
                        yield Text(text)
                elif isinstance(event, Done):
                    finished = True
                    rest = stop.rest()
                    if rest:
                        yield Text(rest)
                    reason = FinishReason.STOP if stop.stopped else event.reason
                    yield Finished(reason, openai_shapes.usage(tokens_in, event.tokens))
                    return
                elif isinstance(event, Failed):
                    finished = True
                    yield event
                    return
                stamped = await session.events.get()
        finally:
            if not finished:
                log.info("request %s cancelled: its HTTP client left", job.request_id)
                self.service.cancel(session, job)

    async def whole(self, events: AsyncIterator[Told], reply: Reply, headers: dict) -> Response:
        text = []
        async for told in events:
            if isinstance(told, Text):
                text.append(told.text)
            elif isinstance(told, Finished):
                return JSONResponse(reply.whole("".join(text), told.reason, told.usage), headers=headers)
            elif isinstance(told, Failed):
                error = refusal(told)
                return JSONResponse(error.body(), error.status, headers=headers)
        raise AssertionError("a request's events end with done or error")

    async def chunks(self, events: AsyncIterator[Told], reply: Reply,
                     include_usage: bool) -> AsyncIterator[ServerSentEvent]:
        """The stream: chunks as data events, queue positions as comments, then [DONE]."""
        if reply.chat:
            yield _data(reply.chunk(first=True))
        async for told in events:
            if isinstance(told, Queued):
                yield ServerSentEvent(comment=f"queued: {told.position} ahead")
            elif isinstance(told, Text):
                yield _data(reply.chunk(told.text))
            elif isinstance(told, Finished):
                yield _data(reply.chunk(reason=told.reason))
                if include_usage:
                    yield _data(reply.usage_chunk(told.usage))
            elif isinstance(told, Failed):
                yield _data(refusal(told).body())
        yield ServerSentEvent(data="[DONE]")


def _data(shape: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(shape, ensure_ascii=False))
