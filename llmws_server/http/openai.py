"""OpenAI's chat completions and completions (http/openai_shapes.py has their request checks and shapes,
http/runs.py the running): each choice's events come back as chunks or whole."""
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.core.events import Failed, Queued, Reasoning, Text, ToolCallArguments, ToolCallStarted
from llmws_server.http import openai_shapes, runs, streams
from llmws_server.http.errors import APIError
from llmws_server.http.openai_shapes import APIRequest, Reply, answer_prefix
from llmws_server.http.runs import Finished, Told, merged, refusal
from llmws_server.sessions.store import StreamSession

if TYPE_CHECKING:
    from llmws_server.http.app import HTTPApi


def routes(api: "HTTPApi") -> list[Route]:
    endpoints = OpenAIEndpoints(api)
    return [Route("/v1/models", api.endpoint(endpoints.models)),
            Route("/v1/chat/completions", api.endpoint(endpoints.chat), methods=["POST"]),
            Route("/v1/completions", api.endpoint(endpoints.completions), methods=["POST"]),
            Route("/v1/chat/completions/{answer_id}/events", api.endpoint(endpoints.chat_events)),
            Route("/v1/completions/{answer_id}/events", api.endpoint(endpoints.completion_events)),
            Route("/v1/embeddings", api.endpoint(endpoints.embeddings), methods=["POST"])]


class OpenAIEndpoints:
    def __init__(self, api: "HTTPApi"):
        self.api, self.service = api, api.service

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai_shapes.models_list([self.service.engine.name], self.api.started))

    async def chat(self, request: Request) -> Response:
        if "last-event-id" in request.headers:  # a stream's client back after a drop
            return self.resume(request, request.headers["last-event-id"], chat=True)
        wanted = openai_shapes.chat_request(await self.api.body(request), self.service.generation_defaults,
                                            self.service.max_batch_size)
        return await self.answer(request, wanted, chat=True)

    async def completions(self, request: Request) -> Response:
        if "last-event-id" in request.headers:
            return self.resume(request, request.headers["last-event-id"], chat=False)
        wanted = openai_shapes.completion_request(await self.api.body(request), self.service.generation_defaults,
                                                  self.service.max_batch_size)
        return await self.answer(request, wanted, chat=False)

    async def chat_events(self, request: Request) -> Response:
        return self.events(request, chat=True)

    async def completion_events(self, request: Request) -> Response:
        return self.events(request, chat=False)

    def events(self, request: Request, chat: bool) -> Response:
        """GET .../{answer_id}/events: a kept stream's events after Last-Event-ID, or after ?after=N, or all."""
        given = request.headers.get("last-event-id")
        if given is None:
            after = request.query_params.get("after", "0")
            if not after.isdigit() or len(after) > 12:
                raise APIError("after must be a whole number: the last event number seen", "after")
            given = f"{request.path_params['answer_id']}/{after}"
        return self.resume(request, given, chat)

    def resume(self, request: Request, last_event_id: str, chat: bool) -> Response:
        answer_id, after = streams.after_event(last_event_id)
        if "answer_id" in request.path_params and request.path_params["answer_id"] != answer_id:
            raise APIError("Last-Event-ID names another stream than the path", "Last-Event-ID")
        stream = streams.kept(self.service.sessions, answer_id, answer_prefix(chat))
        return streams.sse(stream.read(after))

    async def embeddings(self, request: Request) -> Response:
        body = openai_shapes.embeddings_request(await self.api.body(request))
        embedded = await self.service.embed(body.get("input"), StreamSession())
        return JSONResponse(openai_shapes.embeddings(embedded, self.service.engine.name, body))

    async def answer(self, request: Request, wanted: APIRequest, chat: bool) -> Response:
        """Queue a job per choice (they decode together); answer with a stream or the whole answer (whose
        client, should it hang up meanwhile, cancels it as a stream's does)."""
        logprobs = wanted.inference.settings.logprobs is not None
        if not wanted.stream:
            run = await runs.start(self.service, wanted.choices(), wanted.stop)
            reply = Reply(chat, self.service.engine.name, logprobs)
            return await runs.until_disconnect(request, self.whole(run.streams, reply, run.headers))
        sessions = self.service.sessions
        stream = streams.keep(sessions, answer_prefix(chat), self.service.limits["stream_resume_s"])
        try:
            run = await runs.start(self.service, wanted.choices(), wanted.stop)
        except BaseException:
            sessions.forget(stream.session)
            raise
        stream.start(self.chunks(run.streams, Reply(chat, self.service.engine.name, logprobs, stream.answer_id),
                                 wanted.include_usage))
        response = streams.sse(stream.read(0))
        response.headers.update(run.headers)
        return response

    async def whole(self, streams: list[AsyncIterator[Told]], reply: Reply, headers: dict) -> Response:
        choices = [openai_shapes.Choice.empty() for _ in streams]
        tokens_in = tokens_out = 0
        async with aclosing(merged(streams)) as told_all:  # all at once: a return or a leave ends each
            async for index, told in told_all:
                choice = choices[index]
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


def _data(shape: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(shape, ensure_ascii=False))
