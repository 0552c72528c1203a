"""The OpenAI HTTP API's side of the protocol, without a socket: request bodies checked into this server's
typed requests, and the response, chunk and error shapes of chat completions and completions.

A field the API defines and this server cannot honour (echo, best_of, suffix) is refused naming it; fields
it does not define are ignored, as other OpenAI-compatible servers do, since tools send their own extras.
"""
import array
import base64
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

from llmws_server.config import GenerationSettings, validate_generation
from llmws_server.core.events import FinishReason
from llmws_server.core.reply_jobs import Embedded
from llmws_server.core.requests import InferenceRequest, check_turns
from llmws_server.core.tools import checked_tools, response_schema
from llmws_server.engines.api import TokenLogprob
from llmws_server.errors import Refused
from llmws_server.http.errors import APIError

# OpenAI's name for a setting -> this server's (top_k and repetition_penalty are extensions vLLM shares)
SETTINGS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens",
            "max_completion_tokens": "max_new_tokens", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
            "seed": "seed", "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}
# Defined by the API, accepted only at their value that changes nothing.
NEUTRAL = {"echo": False, "best_of": 1, "suffix": None}
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH = {FinishReason.STOP: "stop", FinishReason.CANCELLED: "stop", FinishReason.LENGTH: "length",
          FinishReason.TIMEOUT: "length", FinishReason.TOOL_CALLS: "tool_calls"}


@dataclass(frozen=True)
class APIRequest:
    inference: InferenceRequest
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    n: int = 1  # choices, decoded together

    def choices(self) -> list[InferenceRequest]:
        """One request per choice; with a seed, choice i draws with seed + i (so they differ)."""
        settings = self.inference.settings
        if self.n == 1 or settings.seed is None:
            return [self.inference] * self.n
        return [replace(self.inference, settings=replace(settings, seed=settings.seed + index))
                for index in range(self.n)]


def chat_request(body: object, defaults: dict, max_n: int = 1) -> APIRequest:
    """POST /v1/chat/completions."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(f"messages[{index}].role must be one of {', '.join(ROLES)}", f"messages[{index}].role")
        turn = {key: message[key] for key in ("tool_calls", "tool_call_id") if message.get(key) is not None}
        content = message.get("content")
        turns.append({"role": ROLES[message["role"]], "content": "" if content is None else content, **turn})
    try:
        turns = check_turns(turns)
    except Refused as exc:
        raise APIError(str(exc), exc.field or "messages") from None
    logprobs = logprobs_setting(body.get("logprobs"), body.get("top_logprobs"))
    if body.get("top_logprobs") is not None and logprobs is None:
        raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
    return _request(body, turns, None, defaults, logprobs, max_n)


def completion_request(body: object, defaults: dict, max_n: int = 1) -> APIRequest:
    """POST /v1/completions: the prompt is continued as it is, no chat template."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError("prompt must be a non-empty string (one prompt per request)", "prompt")
    top = top_count(body.get("logprobs"), "logprobs")
    return _request(body, [{"role": "user", "content": prompt}], prompt, defaults, top, max_n)


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    return body


def top_count(value: object, field: str) -> int | None:
    """How many of the likeliest tokens go with each token's logprob: a whole number from 0 to 20, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(f"{field} must be a whole number from 0 to {MAX_TOP_LOGPROBS}", field)
    return value


def logprobs_setting(wanted: object, top: object) -> int | None:
    """Chat's (and Ollama's) logprobs, true or false, and top_logprobs as the engine's one number (None: no
    logprobs)."""
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError("logprobs must be true or false", "logprobs")
    count = top_count(top, "top_logprobs")
    return (count or 0) if wanted else None


def request_settings(given: dict, defaults: dict, names: dict[str, str] = SETTINGS,
                     neutral: Mapping[str, object] = NEUTRAL, prefix: str = "") -> GenerationSettings:
    """The settings `given` names (names: the API's name -> this server's) over the defaults, for every API.
    A value out of range is refused naming the API's field (prefix + its name), and so is a field in `neutral`
    (defined by the API, not honoured here) at another than its neutral value."""
    for name, value in neutral.items():
        if given.get(name, value) not in (value, None):
            raise APIError(f"{prefix}{name} is not supported by this server (only {value!r})", prefix + name)
    settings = dict(defaults)
    for name, ours in names.items():
        if given.get(name) is not None:
            try:
                settings.update(validate_generation({ours: given[name]}))
            except Refused as exc:
                raise APIError(prefix + str(exc).replace(ours, name), prefix + name) from None
    return GenerationSettings(**settings)


def _request(body: dict, turns: list, raw_text: str | None, defaults: dict, logprobs: int | None,
             max_n: int) -> APIRequest:
    settings = request_settings(body, defaults)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError("stream must be true or false, stream_options an object", "stream")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise APIError(f"n must be a whole number from 1 to {max_n} (optimization.max_batch_size)", "n")
    try:
        tools = checked_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls", True))
        schema = response_schema(body.get("response_format"))
    except Refused as exc:
        raise APIError(str(exc), exc.field) from None
    if tools is not None and tools.constrained:
        if schema is not None:
            raise APIError("response_format and a required tool call cannot both shape the answer", "response_format")
        schema = tools.schema()
    settings = replace(settings, logprobs=logprobs, json_schema=schema)
    request = InferenceRequest(turns, settings, None, raw_text, tools)
    return APIRequest(request, stream, bool(options.get("include_usage")), stop_strings(body.get("stop")), n)


def stop_strings(value: object, field: str = "stop") -> tuple[str, ...]:
    """OpenAI's stop (Ollama's options.stop too): a string or a list of them, refused naming `field`."""
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(f"{field} must be a string or a list of up to {MAX_STOPS} non-empty strings "
                       f"of at most {MAX_STOP_CHARS} characters", field)
    return tuple(stops)


# -- shapes -----------------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One choice of a whole answer, as its events built it up."""
    text: list[str]
    reasoning: list[str]
    calls: list[dict]  # {"id", "type": "function", "function": {"name", "arguments"}}
    logprobs: list[TokenLogprob]
    reason: FinishReason = FinishReason.STOP

    @classmethod
    def empty(cls) -> "Choice":
        return cls([], [], [], [])


def chat_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(each.token, each.logprob), "top_logprobs": [entry(*best) for best in each.top]}
                        for each in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0) -> dict:
    """The legacy completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, position = [], offset
    for each in logprobs:
        offsets.append(position)
        position += len(each.token)
    return {"tokens": [each.token for each in logprobs], "token_logprobs": [each.logprob for each in logprobs],
            "top_logprobs": [dict(each.top) for each in logprobs], "text_offset": offsets}


def answer_prefix(chat: bool) -> str:
    return "chatcmpl-" if chat else "cmpl-"


class Reply:
    """One answer's shapes: its id, model and creation time stay the same over every chunk."""

    def __init__(self, chat: bool, model: str, logprobs: bool = False, answer_id: str | None = None):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id = answer_id or answer_prefix(chat) + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}  # a streamed completion's text_offset goes on from chunk to chunk

    def _shape(self, object_name: str, choices: list, **extra: object) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, choices: list[Choice], usage: dict) -> dict:
        return self._shape(self.object, [self._whole_choice(index, choice) for index, choice in enumerate(choices)],
                           usage=usage)

    def _whole_choice(self, index: int, choice: Choice) -> dict:
        text = "".join(choice.text)
        reason = FINISH[choice.reason]
        if not self.chat:
            shown = completion_logprobs(choice.logprobs) if self.logprobs else None
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": shown}
        message: dict = {"role": "assistant", "content": text if text or not choice.calls else None}
        if choice.calls:
            message["tool_calls"] = choice.calls
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        shown = chat_logprobs(choice.logprobs) if self.logprobs else None
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": shown}

    def chunk(self, index: int = 0, delta: dict | None = None, reason: FinishReason | None = None,
              logprobs: tuple[TokenLogprob, ...] = ()) -> dict:
        """A stream chunk of one choice: `delta` holds what is new (content, reasoning_content,
        tool_calls, or the role in the first); the last says the finish reason."""
        finish = FINISH[reason] if reason else None
        if not self.chat:
            shown = None
            if self.logprobs and logprobs:
                shown = completion_logprobs(logprobs, self.offsets.get(index, 0))
                self.offsets[index] = self.offsets.get(index, 0) + sum(len(each.token) for each in logprobs)
            return self._shape(self.object, [{"index": index, "text": (delta or {}).get("content", ""),
                                              "logprobs": shown, "finish_reason": finish}])
        shown = chat_logprobs(logprobs) if self.logprobs and logprobs else None
        return self._shape("chat.completion.chunk", [{"index": index, "delta": delta or {}, "logprobs": shown,
                                                      "finish_reason": finish}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._shape("chat.completion.chunk" if self.chat else self.object, [], usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmws"}
                                       for name in names]}


def embeddings_request(body: object) -> dict:
    """POST /v1/embeddings: input as it came (the core checks it), encoding_format float or base64, and
    dimensions only at the model's own size (checked once the vectors show it)."""
    body = _object(body)
    if body.get("encoding_format", "float") not in ("float", "base64", None):
        raise APIError("encoding_format must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise APIError("dimensions must be a positive whole number", "dimensions")
    return body


def check_dimensions(wanted: object, size: int) -> None:
    """A request's dimensions, where it gives them, are the model's own size: no embedding is shortened."""
    if wanted not in (None, size):
        raise APIError(f"dimensions: this model's embeddings have {size} dimensions and cannot be shortened",
                       "dimensions")


def embeddings(embedded: Embedded, model: str, body: dict) -> dict:
    check_dimensions(body.get("dimensions"), len(embedded.vectors[0]))
    as_base64 = body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": index,
             "embedding": base64.b64encode(array.array("f", vector).tobytes()).decode() if as_base64 else vector}
            for index, vector in enumerate(embedded.vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}}
