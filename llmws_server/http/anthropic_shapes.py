"""The Anthropic Messages API's side of the protocol, without a socket: a /v1/messages (or count_tokens)
body checked into this server's typed request, and the message, content block and error shapes.

Anthropic's blocks become the core's OpenAI-shaped turns (core/requests.check_turns): a user turn's text
and base64 images, an assistant turn's tool_use blocks its tool_calls, a user turn's tool_result blocks
turns of role tool. Consecutive turns of one role are one turn, as Anthropic combines them. What the API
defines and this server cannot honour is refused naming it; fields it does not define are ignored
(docs/anthropic.md lists both).
"""
import json
import uuid
from dataclasses import dataclass, replace

from llmws_server.core.events import FinishReason
from llmws_server.core.requests import InferenceRequest, check_turns
from llmws_server.core.tools import ToolUse, checked_tools, response_schema
from llmws_server.errors import Refused
from llmws_server.http.errors import APIError
from llmws_server.http.openai_shapes import request_settings

# Anthropic's name for a setting -> this server's
SETTINGS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}
MAX_STOPS, MAX_STOP_CHARS = 16, 256
THINKING = ("enabled", "disabled", "adaptive")  # accepted; the model reasons as it was trained to
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
STOP_REASONS = {FinishReason.STOP: "end_turn", FinishReason.CANCELLED: "end_turn", FinishReason.LENGTH: "max_tokens",
                FinishReason.TIMEOUT: "max_tokens", FinishReason.TOOL_CALLS: "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # tool_choice's type -> core/tools' choice
JOIN = "\n\n"  # between the text blocks of one turn
Block = tuple[str, dict]  # where it was ("messages.2.content.0"), the block


@dataclass(frozen=True)
class MessagesRequest:
    inference: InferenceRequest
    stream: bool
    stops: tuple[str, ...]


def messages_request(body: object, defaults: dict, counting: bool = False) -> MessagesRequest:
    """POST /v1/messages; counting: POST /v1/messages/count_tokens, which takes no max_tokens."""
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    if not counting and body.get("max_tokens") is None:
        raise APIError("max_tokens: Field required", "max_tokens")
    _refuse_unhonoured(body)
    try:
        turns = check_turns(_system(body.get("system")) + _turns(body.get("messages")))
    except Refused as exc:
        raise APIError(str(exc), exc.field or "messages") from None
    tools = _tools(body.get("tools"), body.get("tool_choice"))
    schema = _output_schema(body.get("output_config"))
    if tools is not None and tools.constrained:
        if schema is not None:
            raise APIError("output_config.format and a forced tool_choice cannot both shape the answer",
                           "output_config")
        schema = tools.schema()
    settings = replace(request_settings(body, defaults, SETTINGS, neutral={}), json_schema=schema)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", "stream")
    return MessagesRequest(InferenceRequest(turns, settings, None, None, tools), stream,
                           _stops(body.get("stop_sequences")))


def _refuse_unhonoured(body: dict) -> None:
    """The fields Anthropic defines that would change the answer, where this server cannot do what they say."""
    thinking = body.get("thinking")
    if thinking is not None and (not isinstance(thinking, dict) or thinking.get("type") not in THINKING):
        raise APIError('thinking must be {"type": "enabled", "budget_tokens": N}, {"type": "disabled"} or '
                       '{"type": "adaptive"}', "thinking")
    if body.get("mcp_servers"):
        raise APIError("mcp_servers: this server connects to no MCP servers; give the tools in tools", "mcp_servers")
    if body.get("container") is not None:
        raise APIError("container: this server runs no code execution containers", "container")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise APIError("metadata must be an object", "metadata")


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if (not isinstance(value, list) or len(value) > MAX_STOPS
            or not all(isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_CHARS for stop in value)):
        raise APIError(f"stop_sequences must be a list of up to {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", "stop_sequences")
    return tuple(value)


def _output_schema(config: object) -> dict | None:
    """output_config.format {"type": "json_schema", "schema"}: the answer is JSON matching it (constrained
    decoding); output_config.effort is ignored."""
    if config is None:
        return None
    form = config.get("format") if isinstance(config, dict) else None
    if form is None:
        return None
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        raise APIError('output_config.format must be {"type": "json_schema", "schema": {...}}', "output_config")
    try:
        return response_schema({"type": "json_schema", "json_schema": {"schema": form.get("schema")}},
                               "output_config.format")
    except Refused as exc:
        raise APIError(str(exc), "output_config") from None


# -- turns ------------------------------------------------------------------------------------------------

def _system(value: object) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, list) and all(_is_text(block) for block in value):
        value = JOIN.join(block["text"] for block in value)
    if not isinstance(value, str):
        raise APIError('system must be a string or a list of {"type": "text", "text": ...} blocks', "system")
    return [{"role": "system", "content": value}] if value else []


def _is_text(block: object) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)


def _turns(messages: object) -> list[dict]:
    """The messages as the core's turns. A last assistant turn would be a prefill the answer continues,
    which chat templates cannot do: refused, as Anthropic refuses it on models without prefill."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    combined: list[tuple[str, list[Block]]] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(f"{where}.role must be 'user' or 'assistant' (the system prompt goes in system)",
                           f"{where}.role")
        blocks = _blocks(message.get("content"), f"{where}.content")
        if combined and combined[-1][0] == role:
            combined[-1][1].extend(blocks)
        else:
            combined.append((role, blocks))
    if combined[-1][0] == "assistant":
        raise APIError("The last message is the assistant's: prefilling the answer is not supported by this "
                       "server; end with a user message", "messages")
    turns: list[dict] = []
    called: set[str] = set()  # the tool_use ids so far, which tool_result blocks answer
    for role, blocks in combined:
        turns.extend(_user_turns(blocks, called) if role == "user" else [_assistant_turn(blocks, called)])
    return turns


def _blocks(content: object, where: str) -> list[Block]:
    if isinstance(content, str):
        return [(where, {"type": "text", "text": content})]
    if not isinstance(content, list) or not content or \
            not all(isinstance(block, dict) and isinstance(block.get("type"), str) for block in content):
        raise APIError(f"{where} must be a string or a non-empty list of content blocks", where)
    return [(f"{where}.{number}", block) for number, block in enumerate(content)]


def _user_turns(blocks: list[Block], called: set[str]) -> list[dict]:
    """A user message: its tool_result blocks (which Anthropic puts first) as tool turns, then its text
    and images as one user turn."""
    turns, texts, images = [], [], []
    for where, block in blocks:
        if _is_text(block):
            texts.append(block["text"])
        elif block["type"] == "image":
            images.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif block["type"] == "tool_result":
            turns.append(_tool_turn(block, where, called))
        else:
            raise APIError(f"{where}: a user message's blocks may be text, image or tool_result here, "
                           f"not {block['type']!r}", where)
    if texts or images:
        text = JOIN.join(texts)
        turns.append({"role": "user", "content": [{"type": "text", "text": text}, *images] if images else text})
    return turns


def _image_url(block: dict, where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    if source.get("type") != "base64":
        raise APIError(f"{where}.source: only base64 image sources are supported (got {source.get('type')!r}): "
                       "this server fetches no URLs and keeps no files", where)
    if source.get("media_type") not in IMAGE_TYPES or not isinstance(source.get("data"), str):
        raise APIError(f"{where}.source must have a media_type ({', '.join(IMAGE_TYPES)}) and base64 data", where)
    return f"data:{source['media_type']};base64,{source['data']}"


def _tool_turn(block: dict, where: str, called: set[str]) -> dict:
    """A tool_result: its text (an error's marked so) answering the tool_use of the same id."""
    if block.get("tool_use_id") not in called:
        raise APIError(f"{where}.tool_use_id matches no tool_use block of an earlier assistant message", where)
    content = block.get("content", "")
    if isinstance(content, list) and all(_is_text(part) for part in content):
        content = JOIN.join(part["text"] for part in content)
    if not isinstance(content, str):
        raise APIError(f"{where}.content must be a string or text blocks (no images or documents here)", where)
    if block.get("is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _assistant_turn(blocks: list[Block], called: set[str]) -> dict:
    """An assistant message: its text, and its tool_use blocks as calls; past thinking is dropped (chat
    templates leave earlier reasoning out too)."""
    texts, calls = [], []
    for where, block in blocks:
        if _is_text(block):
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                    and isinstance(block.get("input"), dict)):
                raise APIError(f"{where} must be a tool_use block with an id, a name and an input object", where)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
            called.add(block["id"])
        elif block["type"] not in ("thinking", "redacted_thinking"):
            raise APIError(f"{where}: an assistant message's blocks may be text, tool_use or thinking here, "
                           f"not {block['type']!r}", where)
    return {"role": "assistant", "content": JOIN.join(texts), **({"tool_calls": calls} if calls else {})}


# -- tools ------------------------------------------------------------------------------------------------

def _tools(tools: object, choice: object) -> ToolUse | None:
    """Client tools {name, description?, input_schema} and tool_choice as core/tools takes them (OpenAI's
    function shape): any is a required call, tool a named one, both decoded under the tools' grammar."""
    if tools is not None and not isinstance(tools, list):
        raise APIError("tools must be a list", "tools")
    functions = [_function(tool, f"tools.{index}") for index, tool in enumerate(tools or [])]
    wanted, parallel = _choice(choice)
    try:
        return checked_tools(functions, wanted, parallel)
    except Refused as exc:
        raise APIError(str(exc), exc.field or "tools") from None


def _function(tool: object, where: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise APIError(f"{where}: only client tools (name, description, input_schema) are supported, not the "
                       f"server tool {kind!r}", "tools")
    if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict) \
            or not isinstance(tool.get("description", ""), str):
        raise APIError(f"{where} must have a name, an input_schema object and a string description", "tools")
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                             "parameters": tool["input_schema"]}}


def _choice(choice: object) -> tuple[object, bool]:
    """tool_choice as core/tools' choice, and whether more than one call may come."""
    if choice is None:
        return None, True
    if isinstance(choice, dict) and isinstance(choice.get("disable_parallel_tool_use", False), bool):
        kind, parallel = choice.get("type"), not choice.get("disable_parallel_tool_use", False)
        if kind in CHOICES:
            return CHOICES[kind], parallel
        if kind == "tool" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} or '
                   '{"type": "none"} (disable_parallel_tool_use true or false)', "tool_choice")


# -- shapes -----------------------------------------------------------------------------------------------

def message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def tool_use_id(call_id: str) -> str:
    """The core's call id in Anthropic's form (toolu_...); a later tool_result gives it back as it is."""
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict:
    """A call's arguments as tool_use's input object. Grammar-decoded calls are always one; a call the
    model wrote freely (tool_choice auto) whose arguments are no JSON object gets {}."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def stop_reason(reason: FinishReason, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence is not None else STOP_REASONS[reason]


def message(message_id: str, model: str, content: list[dict], reason: str | None, stop_sequence: str | None,
            tokens_in: int, tokens_out: int) -> dict:
    """A whole message, or (reason None, no content) the one message_start gives."""
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}


def error_body(error: APIError) -> dict:
    """Anthropic's error shape; its type goes by the status the refusal has (the figures, as max_context,
    come along)."""
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": str(error), **error.fields}}
