"""OpenAI's chat completions and completions (http/openai_shapes.py has their request checks and shapes):
a request goes to the core as a StreamSession of its own, and its events come back as chunks or whole."""
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.core.events import (
    Done,
    Failed,
    FinishReason,
    Queued,
    Reasoning,
    Stamped,
    Started,
    Text,
    ToolCallArguments,
    ToolCallStarted,
)
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
    """The end of a choice as OpenAI tells it: a stop string's cut is a stop; the usage."""
    reason: FinishReason
    tokens_in: int
    tokens_out: int


Told = Union[Queued, Text, Reasoning, ToolCallStarted, ToolCallArguments, Finished, Failed]  # in order


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
        wanted = openai_shapes.chat_request(await self.api.body(request), self.service.generation_defaults,
                                            self.service.max_batch_size)
        return await self.answer(wanted, chat=True)

    async def completions(self, request: Request) -> Response:
        wanted = openai_shapes.completion_request(await self.api.body(request), self.service.generation_defaults,
                                                  self.service.max_batch_size)
        return await self.answer(wanted, chat=False)

    async def answer(self, wanted: APIRequest, chat: bool) -> Response:
        """Queue a job per choice (they decode together); answer with a stream or the whole answer."""
        runs: list[tuple[InferenceJob, StreamSession]] = []
        try:
            for inference in wanted.choices():
                session = StreamSession()
                runs.append((await self.service.submit(session, inference), session))
            firsts = [await session.events.get() for _, session in runs]
        except BaseException:
            for job, session in runs:
                self.service.cancel(session, job)
            raise
        failed = next((first.event for first in firsts if isinstance(first.event, Failed)), None)
        if failed is not None:  # refused before it started: a proper status, not a stream
            for job, session in runs:
                self.service.cancel(session, job)
            raise refusal(failed)
        headers = {QUEUE_HEADER: str(firsts[0].event.position)} if isinstance(firsts[0].event, Queued) else {}
        reply = Reply(chat, self.service.engine.name, wanted.inference.settings.logprobs is not None)
        streams = [self.events(job, session, first, wanted.stop) for (job, session), first in zip(runs, firsts)]
        if wanted.stream:
            return EventSourceResponse(self.chunks(streams, reply, wanted.include_usage), headers=headers,
                                       ping=15, sep="\n")
        return await self.whole(streams, reply, headers)

    async def events(self, job: InferenceJob, session: StreamSession, stamped: Stamped,
                     stops: tuple[str, ...]) -> AsyncIterator[Told]:
        """A choice's events as OpenAI tells them: queue positions, text, reasoning and tool calls, then
        finished or failed. A stop string ends the text there and cancels the rest; a client that leaves
        cancels it all."""
        stop, tokens_in, finished = StopText(stops), 0, False
        try:
            while True:
                event = stamped.event
                if isinstance(event, Started):
                    tokens_in = event.tokens_in
                elif isinstance(event, Text):
                    if not stop.stopped:
                        text = stop.feed(event.text)
                        if stop.stopped:
                            job.cancelled.set()
                        if text or event.logprobs:
                            yield Text(text, event.logprobs)
                elif isinstance(event, Done):
                    finished = True
                    rest = stop.rest()
                    if rest:
                        yield Text(rest)
                    reason = FinishReason.STOP if stop.stopped else event.reason
                    yield Finished(reason, tokens_in, event.tokens)
                    return
                elif isinstance(event, (Queued, Reasoning, ToolCallStarted, ToolCallArguments, Failed)):
                    finished = isinstance(event, Failed)
                    yield event
                    if finished:
                        return
                stamped = await session.events.get()
        finally:
            if not finished:
                log.info("request %s cancelled: its HTTP client left", job.request_id)
                self.service.cancel(session, job)

    async def whole(self, streams: list[AsyncIterator[Told]], reply: Reply, headers: dict) -> Response:
        choices = [openai_shapes.Choice.empty() for _ in streams]
        tokens_in = tokens_out = 0
        for choice, stream in zip(choices, streams):
            async for told in stream:
                if isinstance(told, Text):
                    choice.text.append(told.text)
                    choice.logprobs.extend(told.logprobs)
                elif isinstance(told, Reasoning):
                    choice.reasoning.append(told.text)
                elif isinstance(told, ToolCallStarted):
                    choice.calls.append({"id": told.id, "type": "function",
                                         "function": {"name": told.name, "arguments": ""}})
                elif isinstance(told, ToolCallArguments):
                    choice.calls[told.index]["function"]["arguments"] += told.text
                elif isinstance(told, Finished):
                    choice.reason, tokens_in = told.reason, told.tokens_in
                    tokens_out += told.tokens_out
                elif isinstance(told, Failed):
                    error = refusal(told)
                    return JSONResponse(error.body(), error.status, headers=headers)
        return JSONResponse(reply.whole(choices, openai_shapes.usage(tokens_in, tokens_out)), headers=headers)

    async def chunks(self, streams: list[AsyncIterator[Told]], reply: Reply,
                     include_usage: bool) -> AsyncIterator[ServerSentEvent]:
        """The stream: each choice's chunks as data events as they come, queue positions as comments,
        then the usage if asked, then [DONE]."""
        if reply.chat:
            for index in range(len(streams)):
                yield _data(reply.chunk(index, {"role": "assistant", "content": ""}))
        tokens_in = tokens_out = 0
        async for index, told in merged(streams):
            if isinstance(told, Queued):
                if index == 0:
                    yield ServerSentEvent(comment=f"queued: {told.position} ahead")
            elif isinstance(told, Text):
                yield _data(reply.chunk(index, {"content": told.text}, logprobs=told.logprobs))
            elif isinstance(told, Reasoning):
                yield _data(reply.chunk(index, {"reasoning_content": told.text}))
            elif isinstance(told, ToolCallStarted):
                call = {"index": told.index, "id": told.id, "type": "function",
                        "function": {"name": told.name, "arguments": ""}}
                yield _data(reply.chunk(index, {"tool_calls": [call]}))
            elif isinstance(told, ToolCallArguments):
                piece = {"index": told.index, "function": {"arguments": told.text}}
                yield _data(reply.chunk(index, {"tool_calls": [piece]}))
            elif isinstance(told, Finished):
                tokens_in, tokens_out = told.tokens_in, tokens_out + told.tokens_out
                yield _data(reply.chunk(index, reason=told.reason))
            elif isinstance(told, Failed):
                yield _data(refusal(told).body())
        if include_usage:
            yield _data(reply.usage_chunk(openai_shapes.usage(tokens_in, tokens_out)))
        yield ServerSentEvent(data="[DONE]")


async def merged(streams: list[AsyncIterator[Told]]) -> AsyncIterator[tuple[int, Told]]:
    """(choice index, what it told), from every choice as it comes; one stream alone goes straight."""
    if len(streams) == 1:
        async for told in streams[0]:
            yield 0, told
        return
    queue: asyncio.Queue[tuple[int, Told | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Told]) -> None:
        try:
            async for told in stream:
                await queue.put((index, told))
        finally:
            await queue.put((index, None))

    pumps = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


def _data(shape: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(shape, ensure_ascii=False))
