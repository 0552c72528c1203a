"""The OpenAI Responses API without a socket: request bodies checked into this server's requests, and a
response told as that API's events, folded from this server's stream messages.

A stored response is a session (sessions/store.py): its job's events are numbered and buffered like any
session's, so the events, and their sequence numbers, can be told again from the buffer at any time:
the same messages in the same order give the same events with the same numbers.
"""
import uuid
from dataclasses import dataclass, replace
from typing import Any

from llmws_server.core.events import (
    Done,
    Event,
    Failed,
    FinishReason,
    Queued,
    Started,
    Text,
    ToolCallArguments,
    ToolCallStarted,
)
from llmws_server.core.requests import InferenceRequest, check_turns
from llmws_server.core.tools import ToolUse, checked_tools, response_schema
from llmws_server.errors import Refused
from llmws_server.http.errors import APIError
from llmws_server.http.openai_shapes import NEUTRAL, request_settings

PREFIX = "resp_"
ENDED = {"completed", "incomplete", "failed", "cancelled"}
STATUS = {FinishReason.STOP: "completed", FinishReason.LENGTH: "incomplete", FinishReason.TIMEOUT: "incomplete",
          FinishReason.CANCELLED: "cancelled", FinishReason.TOOL_CALLS: "completed"}
# Responses settings -> chat completions' (checked by the same code)
SETTINGS = {"max_output_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
            "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}


@dataclass(frozen=True)
class ResponsesRequest:
    inference: InferenceRequest
    stream: bool
    background: bool
    store: bool
    settings: dict  # as the response object shows them


def response_id(session_id: str) -> str:
    return PREFIX + uuid.UUID(session_id).hex


def session_id_of(value: str) -> str | None:
    """The session behind a response id, or None for what is not one."""
    if not value.startswith(PREFIX):
        return None
    try:
        return str(uuid.UUID(hex=value[len(PREFIX):]))
    except ValueError:
        return None


def responses_request(body: object, defaults: dict) -> ResponsesRequest:
    """POST /v1/responses."""
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    for name in ("previous_response_id", "conversation", "prompt"):
        if body.get(name):
            raise APIError(f"{name} is not supported by this server", name)
    turns = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    turns += _input_turns(body.get("input"))
    try:
        turns = check_turns(turns)
        tools = _tool_use(body)
        schema = response_schema(_chat_format((body.get("text") or {}).get("format")), "text.format")
    except Refused as exc:  # text.format has no json_schema level: its schema is text.format.schema
        field = (exc.field or "input").replace("format.json_schema.", "format.")
        raise APIError(str(exc).replace("format.json_schema.", "format."), field) from None
    if tools is not None and tools.constrained:
        if schema is not None:
            raise APIError("text.format and a required tool call cannot both shape the answer", "text.format")
        schema = tools.schema()
    named = {chat: body[ours] for ours, chat in SETTINGS.items() if body.get(ours) is not None}
    try:
        settings = request_settings({**{k: body[k] for k in NEUTRAL if k in body}, **named}, defaults)
    except APIError as exc:
        assert exc.param is not None  # request_settings names the setting it refuses
        ours = next((key for key, chat in SETTINGS.items() if chat == exc.param), exc.param)
        raise APIError(str(exc).replace(str(exc.param), ours), ours) from None
    flags = {name: body.get(name, name == "store") for name in ("stream", "background", "store")}
    if not all(isinstance(value, bool) for value in flags.values()):
        raise APIError("stream, background and store must be true or false", "stream")
    if flags["background"] and not flags["store"]:
        raise APIError("background responses must be stored (store: true)", "store")
    shown = {"temperature": settings.temperature, "top_p": settings.top_p,
             "max_output_tokens": body.get("max_output_tokens"), "tools": body.get("tools") or [],
             "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": tools is None or tools.parallel}
    settings = replace(settings, json_schema=schema)
    return ResponsesRequest(InferenceRequest(turns, settings, None, tools=tools), flags["stream"], flags["background"],
                            flags["store"], shown)


def _tool_use(body: dict) -> ToolUse | None:
    """The Responses API's function tools ({"type": "function", "name", "parameters"}) in chat's shape."""
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) and tool.get("type") == "function"
                                              for tool in tools):
        raise Refused("tools: this server takes function tools only", "tools")
    functions = [{"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters")
                                                   if key in tool}} for tool in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return checked_tools(functions, choice, body.get("parallel_tool_calls", True))


def _chat_format(value: object) -> object:
    """text.format ({"type": "json_schema", "name", "schema", "strict"}) as chat's response_format."""
    if isinstance(value, dict) and value.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": value.get("name"), "schema": value.get("schema")}}
    return value


def _input_turns(value: object) -> list[dict]:
    """input: a string (the user's), or a list of messages whose content is a string or typed parts."""
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError("input must be a non-empty string or list of messages", "input")
    turns: list[dict] = []
    for index, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind in ("function_call", "function_call_output"):
            turns.append(_call_turn(item, turns))
            continue
        if not isinstance(item, dict) or kind != "message" or "role" not in item:
            raise APIError(f"input[{index}] must be a message {{role, content}}, a function_call or a "
                           "function_call_output", f"input[{index}]")
        role = "system" if item["role"] == "developer" else item["role"]
        content = item.get("content")
        if isinstance(content, list):
            content = [_part(part, f"input[{index}].content[{number}]") for number, part in enumerate(content)]
        turns.append({"role": role, "content": content})
    return turns


def _call_turn(item: dict, turns: list[dict]) -> dict:
    """A function_call item as an assistant turn's call (calls in a row share one turn), a
    function_call_output as the tool turn that answers it."""
    if item["type"] == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}
    call = {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
    if turns and turns[-1]["role"] == "assistant" and turns[-1].get("tool_calls"):
        previous = turns.pop()
        return {**previous, "tool_calls": [*previous["tool_calls"], call]}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _part(part: object, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or kind not in PARTS:
        raise APIError(f"{where} must be an input_text, output_text or input_image part", where)
    if PARTS[kind] == "text":
        return {"type": "text", "text": part.get("text")}
    return {"type": "image_url", "image_url": {"url": part.get("image_url")}}


class ResponseState:
    """One response as the Responses API tells it, built up from this server's stream messages for it."""

    text: list[str]
    tokens_out: int | None
    error: dict | None
    incomplete: dict | None
    position: int | None

    def __init__(self, session_id: str, model: str, created_at: float, background: bool, settings: dict):
        self.id = response_id(session_id)
        self.item_id = "msg_" + self.id[len(PREFIX):]
        self.model, self.created_at, self.background, self.settings = model, created_at, background, settings
        self.status, self.text, self.tokens_in, self.tokens_out = "queued", [], 0, None
        self.error = self.incomplete = self.position = None
        self.calls: list[dict] = []  # function_call items, after the message item
        self.number = -1

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def opening(self) -> list[dict]:
        return [self._event("response.created", response=self.object())]

    def fold(self, event: Event) -> list[dict]:
        """The Responses events one of the core's events makes (queued, started, text, done, failed)."""
        if isinstance(event, Queued):
            self.position = event.position
            return [self._event("response.queued", response=self.object(), queue_position=self.position)]
        if isinstance(event, Started):
            self.status, self.tokens_in, self.position = "in_progress", event.tokens_in, None
            return [self._event("response.in_progress", response=self.object()),
                    self._event("response.output_item.added", output_index=0, item=self._item("in_progress", [])),
                    self._event("response.content_part.added", **self._where(), part=self._part(""))]
        if isinstance(event, Text):
            self.text.append(event.text)
            return [self._event("response.output_text.delta", **self._where(), delta=event.text, logprobs=[])]
        if isinstance(event, ToolCallStarted):
            self.calls.append({"type": "function_call", "id": "fc_" + event.id.removeprefix("call_"),
                               "call_id": event.id, "name": event.name, "arguments": "", "status": "in_progress"})
            return [self._event("response.output_item.added", output_index=len(self.calls), item=dict(self.calls[-1]))]
        if isinstance(event, ToolCallArguments):
            call = self.calls[event.index]
            call["arguments"] += event.text
            return [self._event("response.function_call_arguments.delta", item_id=call["id"],
                                output_index=event.index + 1, delta=event.text)]
        if isinstance(event, Done):
            return self._end(event)
        if isinstance(event, Failed):
            self.status, self.error = "failed", {"code": "server_error", "message": event.message}
            return [self._event("response.failed", response=self.object())]
        return []

    def _end(self, done: Done) -> list[dict]:
        self.tokens_out, self.status = done.tokens, STATUS[done.reason]
        if self.status == "incomplete":
            self.incomplete = {"reason": "max_output_tokens"}
        text, events = "".join(self.text), []
        if self.tokens_in:  # it started: close what the start opened
            item_status = "completed" if self.status == "completed" else "incomplete"
            events = [self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
                      self._event("response.content_part.done", **self._where(), part=self._part(text)),
                      self._event("response.output_item.done", output_index=0,
                                  item=self._item(item_status, [self._part(text)]))]
        for number, call in enumerate(self.calls, start=1):
            call["status"] = "completed"
            events += [self._event("response.function_call_arguments.done", item_id=call["id"], output_index=number,
                                   arguments=call["arguments"]),
                       self._event("response.output_item.done", output_index=number, item=dict(call))]
        return events + [self._event(f"response.{self.status}", response=self.object())]

    def object(self) -> dict:
        """The response object as it stands."""
        item_status = self.status if self.status in ("completed", "in_progress") else "incomplete"
        output = [self._item(item_status, [self._part("".join(self.text))])] if self.tokens_in else []
        output += [dict(call) for call in self.calls]
        usage = None if self.tokens_out is None else {
            "input_tokens": self.tokens_in, "output_tokens": self.tokens_out,
            "total_tokens": self.tokens_in + self.tokens_out,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "background": self.background, "model": self.model, "output": output, "error": self.error,
                "incomplete_details": self.incomplete, "usage": usage, "tools": [], "tool_choice": "auto",
                "parallel_tool_calls": False, "queue_position": self.position, **self.settings}

    def _event(self, kind: str, **fields: Any) -> dict:  # JSON values (`object` is a method's name here)
        self.number += 1
        return {"type": kind, "sequence_number": self.number, **fields}

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _item(self, status: str, content: list) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
