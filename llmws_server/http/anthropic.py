"""Anthropic's Messages API: POST /v1/messages (whole or streamed as Anthropic's server-sent events) and
POST /v1/messages/count_tokens, over http/runs.py; http/anthropic_shapes.py has the request checks and the
shapes. Refusals come in Anthropic's error shape, a stream's failure as its `error` event.

A stream goes: pings while it waits, message_start (empty content, usage.input_tokens) once it starts, ping,
then for each content block content_block_start, content_block_delta* (text_delta, thinking_delta,
input_json_delta), content_block_stop, then message_delta (stop_reason, stop_sequence, usage.output_tokens)
and message_stop.
"""
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, cast

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.core.events import Queued, Reasoning, Started, Text, ToolCallArguments, ToolCallStarted
from llmws_server.http import anthropic_shapes as shapes
from llmws_server.http import runs
from llmws_server.http.runs import Failed, Finished, Stream, Told, refusal

if TYPE_CHECKING:
    from llmws_server.http.app import HTTPApi

PING_S = 15


def routes(api: "HTTPApi") -> list[Route]:
    endpoints = AnthropicEndpoints(api)
    return [Route("/v1/messages", api.endpoint(endpoints.messages, shape=shapes.error_body), methods=["POST"]),
            Route("/v1/messages/count_tokens", api.endpoint(endpoints.count_tokens, shape=shapes.error_body),
                  methods=["POST"])]


class Content:
    """One answer's content blocks as its events build them, one block open at a time: take() gives the
    stream events each piece makes, content() the whole message's blocks."""

    def __init__(self) -> None:
        self.blocks: list[dict] = []
        self.open = False  # the last block takes more deltas
        self.calls: dict[int, int] = {}  # a tool call's index -> its block's
        self.arguments: dict[int, list[str]] = {}  # a tool_use block's input JSON, as it came

    def take(self, told: Told) -> list[dict]:
        if isinstance(told, Text) and told.text:
            return self._add("text", told.text)
        if isinstance(told, Reasoning) and told.text:
            return self._add("thinking", told.text)
        if isinstance(told, ToolCallStarted):
            events = self.close()
            self.calls[told.index] = len(self.blocks)
            self.arguments[len(self.blocks)] = []
            return events + self._start({"type": "tool_use", "id": shapes.tool_use_id(told.id), "name": told.name,
                                         "input": {}})
        if isinstance(told, ToolCallArguments) and told.text:
            index = self.calls[told.index]
            self.arguments[index].append(told.text)
            return [_delta(index, {"type": "input_json_delta", "partial_json": told.text})]
        return []

    def _add(self, kind: str, text: str) -> list[dict]:
        """Text or thinking, in the open block of its kind or a new one."""
        events = []
        if not (self.open and self.blocks[-1]["type"] == kind):
            events = self.close() + self._start({"type": "text", "text": ""} if kind == "text" else
                                                {"type": "thinking", "thinking": "", "signature": ""})
        self.blocks[-1][kind] += text
        return [*events, _delta(len(self.blocks) - 1, {"type": f"{kind}_delta", kind: text})]

    def _start(self, block: dict) -> list[dict]:
        self.blocks.append(dict(block))
        self.open = True
        return [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": block}]

    def close(self) -> list[dict]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def content(self) -> list[dict]:
        return [{**block, "input": shapes.tool_input("".join(self.arguments[index]))}
                if block["type"] == "tool_use" else block for index, block in enumerate(self.blocks)]


def _delta(index: int, delta: dict) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": delta}


class AnthropicEndpoints:
    def __init__(self, api: "HTTPApi"):
        self.api, self.service = api, api.service

    async def count_tokens(self, request: Request) -> Response:
        wanted = shapes.messages_request(await self.api.body(request), self.service.generation_defaults,
                                         counting=True)
        return JSONResponse({"input_tokens": await runs.prompt_tokens(self.service, wanted.inference)})

    async def messages(self, request: Request) -> Response:
        wanted = shapes.messages_request(await self.api.body(request), self.service.generation_defaults)
        run = await runs.start(self.service, [wanted.inference], wanted.stops)
        stream = cast(Stream, run.streams[0])
        message_id, model = shapes.message_id(), self.service.engine.name
        if wanted.stream:
            events = message_events(stream, message_id, model)
            return EventSourceResponse(events, headers=run.headers, ping=PING_S, sep="\n",
                                       ping_message_factory=lambda: _sse({"type": "ping"}))
        return await runs.until_disconnect(request, whole_message(stream, message_id, model, run.headers))


async def whole_message(stream: Stream, message_id: str, model: str, headers: dict) -> Response:
    """The answer as one message; a failure as the error it is."""
    content = Content()
    async with aclosing(stream):
        async for told in stream:
            if isinstance(told, Finished):
                shown = shapes.message(message_id, model, content.content(),
                                       shapes.stop_reason(told.reason, told.stop), told.stop, told.tokens_in,
                                       told.tokens_out)
                return JSONResponse(shown, headers=headers)
            if isinstance(told, Failed):
                error = refusal(told)
                return JSONResponse(shapes.error_body(error), error.status, headers=headers)
            content.take(told)
    raise RuntimeError("an answer's events ended without finished or failed")


async def message_events(stream: Stream, message_id: str, model: str) -> AsyncGenerator[ServerSentEvent, None]:
    """The answer as Anthropic's event stream (the module's docstring has the order): pings while it waits,
    message_start with the prompt's tokens once it starts; a failure as its error event, which ends it."""
    content = Content()
    async with aclosing(stream):
        async for told in stream:
            if isinstance(told, Queued):
                yield _sse({"type": "ping"})
            elif isinstance(told, Started):
                yield _sse({"type": "message_start", "message": shapes.message(message_id, model, [], None, None,
                                                                                told.tokens_in, 0)})
                yield _sse({"type": "ping"})
            elif isinstance(told, Finished):
                for event in content.close():
                    yield _sse(event)
                yield _sse({"type": "message_delta", "usage": {"output_tokens": told.tokens_out},
                            "delta": {"stop_reason": shapes.stop_reason(told.reason, told.stop),
                                      "stop_sequence": told.stop}})
                yield _sse({"type": "message_stop"})
                return
            elif isinstance(told, Failed):
                yield _sse(shapes.error_body(refusal(told)))
                return
            else:
                for event in content.take(told):
                    yield _sse(event)


def _sse(event: dict) -> ServerSentEvent:
    return ServerSentEvent(event=event["type"], data=json.dumps(event, ensure_ascii=False))
