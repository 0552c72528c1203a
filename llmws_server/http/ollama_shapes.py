"""Ollama's API side of the protocol, without a socket: /api/chat and /api/generate bodies checked into
this server's typed requests, and the shapes of what goes back (chunks, the final chunk's counts and
durations, tool calls, the model entries of /api/tags, /api/show and /api/ps).

Rules (docs/ollama.md has the table): an option that samples as this server samples is honoured; one
about how Ollama loads or runs a model is ignored (this server decided that at load); a sampler this
server does not have is accepted only at its value that changes nothing; a field this server cannot
honour (template, context, suffix) is refused naming it; keep_alive is ignored (the model stays loaded).
"""
import hashlib
import json
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from llmws_server.config import GenerationSettings
from llmws_server.core.constraints import ANY_JSON_OBJECT, checked_schema
from llmws_server.core.events import FinishReason
from llmws_server.core.requests import InferenceRequest, check_turns, image_list
from llmws_server.core.tools import checked_tools
from llmws_server.engines.api import TokenLogprob
from llmws_server.errors import Refused
from llmws_server.http.errors import APIError
from llmws_server.http.openai_shapes import logprobs_setting, request_settings, stop_strings

if TYPE_CHECKING:
    from llmws_server.engines.api import Engine

# Ollama's option -> this server's generation setting
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_new_tokens",
           "repeat_penalty": "repetition_penalty", "seed": "seed", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
UNBOUNDED = (-1, -2)  # num_predict: as many as the context leaves room for
# Samplers this server does not have: accepted only at the value that turns them off.
NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1, "typical_p": 1, "min_p": 0}
ROLES = ("system", "user", "assistant", "tool")
MB = 1024 ** 2
HUB = "https://huggingface.co/"
HUB_NAME = re.compile(r"^(?:(?:hf\.co|huggingface\.co)/)?([\w.-]+/[\w.-]+)$")  # org/name, as Ollama's hf.co/...
LEVELS = ("high", "medium", "low")  # think's levels are taken as true: no model here has levels
DONE_REASON = {FinishReason.STOP: "stop", FinishReason.CANCELLED: "stop", FinishReason.LENGTH: "length",
               FinishReason.TIMEOUT: "length", FinishReason.TOOL_CALLS: "stop"}  # Ollama says stop for calls


def error_body(error: APIError) -> dict:
    """Ollama's error shape: {"error": "message"}, with the status."""
    return {"error": str(error)}


@dataclass(frozen=True)
class OllamaRequest:
    inference: InferenceRequest
    stream: bool
    stop: tuple[str, ...]
    num_ctx: int | None  # prompt and answer together at most this many tokens (None: the model's context)
    load_only: bool  # no prompt: Ollama's way of asking for the model to be loaded, answered at once


def requested_model(body: object) -> tuple[dict, str]:
    """The body as an object, and the model it names (Ollama requires one)."""
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    model = body.get("model", body.get("name"))  # older clients send "name"
    if not isinstance(model, str) or not model:
        raise APIError("model is required", "model")
    return body, model


def same_model(given: str, served: str) -> bool:
    """A request's model names the served one: its name, or name:latest (case aside)."""
    return given.lower().removesuffix(":latest") == served.lower()


def chat_request(body: dict, defaults: dict, max_context: int, thinks: bool) -> OllamaRequest:
    """POST /api/chat: messages (images base64 in a user turn, tool calls with arguments as objects, tool
    results in order), tools, format, think, options."""
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise APIError("messages must be a list", "messages")
    if not messages:
        return _load_only(body, defaults)
    turns, images = [], {}
    calls: list[tuple[str, str]] = []  # (id, name) of the calls so far, unanswered
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(f"messages[{index}].role must be one of {', '.join(ROLES)}", f"messages[{index}].role")
        turns.append(_turn(message, f"messages[{index}]", calls))
        if message.get("images"):
            images[index] = message["images"]
    try:
        turns = check_turns(turns)
        for index, encoded in images.items():
            if turns[index]["role"] != "user":
                raise Refused(f"messages[{index}]: only user turns may hold images")
            turns[index]["images"] = image_list(encoded, f"messages[{index}].images")
        tools = checked_tools(body.get("tools"), body.get("tool_choice"))  # tool_choice: this server's extension
    except Refused as exc:
        raise APIError(str(exc), exc.field or "messages") from None
    return _request(body, InferenceRequest(turns, _settings(body, defaults, max_context), None, None, tools), thinks)


def _turn(message: dict, where: str, calls: list[tuple[str, str]]) -> dict:
    """One Ollama message as this server's turn. Ollama's calls have no ids: each gets one here, and a tool
    result answers the earliest unanswered call (of its tool_name, when it says)."""
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise APIError(f"{where}.content must be a string", f"{where}.content")
    turn: dict = {"role": message["role"], "content": content or ""}
    if message["role"] == "assistant" and message.get("tool_calls"):
        if not isinstance(message["tool_calls"], list):
            raise APIError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        turn["tool_calls"] = [_call_in(call, f"{where}.tool_calls[{number}]", calls)
                              for number, call in enumerate(message["tool_calls"])]
    if message["role"] == "tool":
        name = message.get("tool_name")
        answered = next((call for call in calls if name is None or call[1] == name), None)
        if answered is None:
            raise APIError(f"{where} is a tool result, but no earlier tool call is unanswered"
                           + (f" for {name!r}" if name else ""), where)
        calls.remove(answered)
        turn["tool_call_id"] = answered[0]
    return turn


def _call_in(call: object, where: str, calls: list[tuple[str, str]]) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not isinstance(function.get("arguments", {}), (dict, str)):
        raise APIError(f'{where} must be {{"function": {{"name": ..., "arguments": {{...}}}}}}', where)
    arguments = function.get("arguments", {})
    call_id = call["id"] if isinstance(call.get("id"), str) else "call_" + "_".join(re.findall(r"\d+", where))
    calls.append((call_id, function["name"]))
    return {"id": call_id, "type": "function", "function": {
        "name": function["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def generate_request(body: dict, defaults: dict, max_context: int, thinks: bool) -> OllamaRequest:
    """POST /api/generate: prompt (through the chat template, after `system`; with raw: true continued as
    it is), images, format, think, options."""
    unsupported = {"template": "the model's own chat template is used", "suffix": "no fill-in-the-middle",
                   "context": "send the conversation to /api/chat"}
    for name, instead in unsupported.items():
        if body.get(name):
            raise APIError(f"{name} is not supported by this server: {instead}", name)
    prompt, system, raw = body.get("prompt") or "", body.get("system") or "", body.get("raw", False)
    if not isinstance(prompt, str) or not isinstance(system, str) or not isinstance(raw, bool):
        raise APIError("prompt and system must be strings, raw true or false", "prompt")
    images = body.get("images") or []
    if not prompt and not images:
        return _load_only(body, defaults)
    if raw and images:
        raise APIError("images need the chat template: they cannot go with raw: true", "raw")
    try:
        turns = ([{"role": "system", "content": system}] if system and not raw else []) + [
            {"role": "user", "content": prompt, **({"images": image_list(images, "images")} if images else {})}]
    except Refused as exc:
        raise APIError(str(exc), "images") from None
    settings = _settings(body, defaults, max_context)
    return _request(body, InferenceRequest(turns, settings, None, prompt if raw else None), thinks)


def _load_only(body: dict, defaults: dict) -> OllamaRequest:
    inference = InferenceRequest([], GenerationSettings(**defaults), None)
    return OllamaRequest(inference, False, (), None, True)


def _request(body: dict, inference: InferenceRequest, thinks: bool) -> OllamaRequest:
    """The fields chat and generate share: format, think, logprobs, stream, stop and num_ctx."""
    think = body.get("think")
    if think is not None and not (isinstance(think, bool) or think in LEVELS):
        raise APIError('think must be true, false, "high", "medium" or "low"', "think")
    if think not in (None, False) and not thinks:
        raise APIError(f'"{body.get("model") or body.get("name")}" does not support thinking', "think")
    stream = stream_flag(body)
    schema, tools = _format(body.get("format")), inference.tools
    if tools is not None and tools.constrained:  # a call is required: decoded under the tools' grammar
        if schema is not None:
            raise APIError("format and a required tool call cannot both shape the answer", "format")
        schema = tools.schema()
    settings = replace(inference.settings, json_schema=schema,
                       logprobs=logprobs_setting(body.get("logprobs"), body.get("top_logprobs")))
    options = _options(body)
    inference = replace(inference, settings=settings, reasoning=think is not False)
    return OllamaRequest(inference, stream, stop_strings(options.get("stop"), "options.stop"),
                         _num_ctx(options.get("num_ctx")), False)


def stream_flag(body: dict) -> bool:
    """stream: Ollama streams unless told not to."""
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", "stream")
    return stream


def _options(body: dict) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise APIError("options must be an object", "options")
    return options


def _settings(body: dict, defaults: dict, max_context: int) -> GenerationSettings:
    """The options over the server's defaults; num_predict -1 or -2 is as long as the context allows (the
    job cuts it to the room the prompt leaves)."""
    options = _options(body)
    predict = options.get("num_predict")
    if predict in UNBOUNDED and not isinstance(predict, bool):
        options = {**options, "num_predict": max_context}
    return request_settings(options, defaults, OPTIONS, NEUTRAL_OPTIONS, "options.")


def _num_ctx(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError("options.num_ctx must be a whole number >= 1", "options.num_ctx")
    return value


def _format(value: object) -> dict | None:
    """format: "json" is any JSON object, a JSON schema is that schema (both by constrained decoding)."""
    if value in (None, ""):
        return None
    if value == "json":
        return ANY_JSON_OBJECT
    if not isinstance(value, dict):
        raise APIError('format must be "json" or a JSON schema object', "format")
    try:
        return checked_schema(value, "format")
    except Refused as exc:
        raise APIError(str(exc), "format") from None


# -- shapes -----------------------------------------------------------------------------------------------

def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes created_at and modified_at."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def call_out(call_id: str, index: int, name: str, arguments: str) -> dict | None:
    """A tool call in Ollama's shape (arguments as an object), or None when its arguments are not a JSON
    object (a call cut short by num_predict)."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    return {"id": call_id, "function": {"index": index, "name": name, "arguments": parsed}}


def logprobs_out(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[dict]:
    return [{"token": each.token, "logprob": each.logprob,
             "top_logprobs": [{"token": token, "logprob": logprob} for token, logprob in each.top]}
            for each in logprobs]


@dataclass
class Timing:
    """When an answer arrived, left the queue (as far as this front end sees: its last queue position, or
    its arrival), told its first piece and ended, in nanoseconds of time.monotonic_ns."""
    arrived: int
    started: int
    first: int | None = None

    @classmethod
    def now(cls) -> "Timing":
        moment = time.monotonic_ns()
        return cls(moment, moment)

    def counts(self, reason: FinishReason, tokens_in: int, tokens_out: int) -> dict:
        """The final chunk's fields: load_duration is 0 (the model is loaded before any request)."""
        end = time.monotonic_ns()
        first = self.first if self.first is not None else end
        return {"done": True, "done_reason": DONE_REASON[reason], "total_duration": end - self.arrived,
                "load_duration": 0, "prompt_eval_count": tokens_in, "prompt_eval_duration": first - self.started,
                "eval_count": tokens_out, "eval_duration": end - first}


class Reply:
    """One answer's pieces in Ollama's shape: chat's `message` or generate's `response` and `thinking`."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model

    def piece(self, text: str = "", thinking: str = "", calls: list[dict] | None = None,
              logprobs: list[dict] | None = None, done: dict | None = None) -> dict:
        shape: dict = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            shape["message"] = message
        else:
            shape["response"] = text
            if thinking:
                shape["thinking"] = thinking
        if logprobs:
            shape["logprobs"] = logprobs
        return {**shape, **(done or {"done": False})}

    def loaded(self) -> dict:
        """The answer to a request without a prompt: the model is loaded (it always is)."""
        return self.piece(done={"done": True, "done_reason": "load"})


def pull_source(model: str) -> str:
    """The repository a pull names: its URL (the download checks its prefix against the allowed ones).
    A tag other than latest (a quantization of Ollama's library) is refused."""
    head, _, tail = model.rpartition("/")
    if ":" in tail:
        tail, _, tag = tail.partition(":")
        if tag != "latest":
            raise APIError(f"{model}: tags are not supported here (only :latest); name the repository", "model")
    source = f"{head}/{tail}" if head else tail
    if "://" in source:
        return source
    if match := HUB_NAME.match(source):
        return HUB + match.group(1)
    raise APIError(f"{model}: pull takes a Hugging Face org/name or a repository URL; Ollama's library is not "
                   "served here", "model")


def listed(entry: dict, folder: Path, engine: "Engine") -> dict:
    """A catalogue entry as /api/tags and /api/ps list a model; what only loading tells (parameters, the
    dtype or quantization) for the loaded one."""
    modified = folder.stat().st_mtime if folder.exists() else time.time()
    family = re.sub(r"For[A-Z]\w*$", "", entry["architecture"]).lower()
    loaded, name = entry["loaded"], f"{entry['name']}:latest"
    details = {"parent_model": "", "format": "gguf" if entry["engine"] == "llama.cpp" else "safetensors",
               "family": family, "families": [family],
               "parameter_size": f"{engine.params / 1e6:.0f}M" if loaded else "",
               "quantization_level": engine.dtype_name if loaded else entry.get("quantization", "")}
    return {"name": name, "model": name, "modified_at": timestamp(modified), "size": int(entry["size_mb"] * MB),
            "digest": hashlib.sha256(f"{entry['path']}:{modified}".encode()).hexdigest(), "details": details}


def parameters(defaults: dict) -> str:
    """The server's generation defaults as /api/show's parameters, in Ollama's names where it has them."""
    names = {ours: theirs for theirs, ours in OPTIONS.items()}
    return "\n".join(f"{names.get(name, name)} {value}" for name, value in defaults.items())
