"""The OpenAI HTTP API's side of the protocol, without a socket: request bodies checked into this server's
typed requests, and the response, chunk and error shapes of chat completions and completions.

A field the API defines and this server cannot honour (n > 1, tools, logprobs, a penalty other than 0) is
refused naming it; fields it does not define are ignored, as other OpenAI-compatible servers do, since
tools send their own extras.
"""
import time
import uuid
from dataclasses import dataclass

from llmws_server.config import GenerationSettings, validate_generation
from llmws_server.core.events import FinishReason
from llmws_server.core.requests import InferenceRequest, check_turns
from llmws_server.errors import Refused
from llmws_server.http.errors import APIError

# OpenAI's name for a setting -> this server's (top_k and repetition_penalty are extensions vLLM shares)
SETTINGS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens",
            "max_completion_tokens": "max_new_tokens", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
# Defined by the API, accepted only at their value that changes nothing.
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "tools": None,
           "tool_choice": None, "response_format": None, "seed": None, "echo": False, "best_of": 1, "suffix": None}
MAX_STOPS, MAX_STOP_CHARS = 4, 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {FinishReason.STOP: "stop", FinishReason.CANCELLED: "stop", FinishReason.LENGTH: "length",
          FinishReason.TIMEOUT: "length"}


@dataclass(frozen=True)
class APIRequest:
    inference: InferenceRequest
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def chat_request(body, defaults: dict) -> APIRequest:
    """POST /v1/chat/completions."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(f"messages[{index}].role must be one of {', '.join(ROLES)}", f"messages[{index}].role")
        content = message.get("content")
        turns.append({"role": ROLES[message["role"]], "content": "" if content is None else content})
    try:
        turns = check_turns(turns)
    except Refused as exc:
        raise APIError(str(exc), "messages") from None
    return _request(body, turns, None, defaults)


def completion_request(body, defaults: dict) -> APIRequest:
    """POST /v1/completions: the prompt is continued as it is, no chat template."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError("prompt must be a non-empty string (one prompt per request)", "prompt")
    return _request(body, [{"role": "user", "content": prompt}], prompt, defaults)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    return body


def request_settings(body: dict, defaults: dict) -> GenerationSettings:
    """The body's settings over the defaults; what the API defines and this server cannot honour is refused."""
    for name, neutral in NEUTRAL.items():
        if body.get(name, neutral) not in (neutral, None):
            raise APIError(f"{name} is not supported by this server (only {neutral!r})", name)
    settings = dict(defaults)
    for name, ours in SETTINGS.items():
        if body.get(name) is not None:
            try:
                settings.update(validate_generation({ours: body[name]}))
            except Refused as exc:
                raise APIError(str(exc).replace(ours, name), name) from None
    return GenerationSettings(**settings)


def _request(body: dict, turns: list, raw_text, defaults: dict) -> APIRequest:
    settings = request_settings(body, defaults)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError("stream must be true or false, stream_options an object", "stream")
    request = InferenceRequest(turns, settings, None, raw_text)
    return APIRequest(request, stream, bool(options.get("include_usage")), _stops(body.get("stop")))


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings "
                       f"of at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


class StopText:
    """Text as it streams, cut at the first stop string: the one that is complete first (the text after it
    would never be generated), the longer one where two end together; so the cut is the same however the
    text is split into pieces. What could be the start of a stop string is held back until the next piece
    shows it is not."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        """The part of the text so far that may be sent now."""
        self.held += text
        found = [(index + len(stop), index) for stop in self.stops if (index := self.held.find(stop)) >= 0]
        if found:
            ready, self.held, self.stopped = self.held[:min(found)[1]], "", True
            return ready
        keep = max((size for stop in self.stops for size in range(1, len(stop))
                    if self.held.endswith(stop[:size])), default=0)
        ready, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return ready

    def rest(self) -> str:
        """At the end: what was held back (no stop string came)."""
        rest, self.held = self.held, ""
        return rest


# -- shapes -----------------------------------------------------------------------------------------------

class Reply:
    """One answer's shapes: its id, model and creation time stay the same over every chunk."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _shape(self, object_name: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, reason: FinishReason, usage: dict) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        return self._shape(self.object, [{**choice, "finish_reason": FINISH[reason], "logprobs": None}],
                           usage=usage)

    def chunk(self, text: str | None = None, reason: FinishReason | None = None, first: bool = False) -> dict:
        """A stream chunk: the first says the role, the last the finish reason."""
        if not self.chat:
            return self._shape(self.object, [{"index": 0, "text": text or "", "logprobs": None,
                                              "finish_reason": FINISH[reason] if reason else None}])
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        return self._shape("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": FINISH[reason] if reason else None}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._shape("chat.completion.chunk" if self.chat else self.object, [], usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmws"}
                                       for name in names]}
