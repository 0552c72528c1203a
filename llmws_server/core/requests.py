"""What a front end hands the core: JSON text checked against hostile shapes, a conversation's turns
checked, generation settings validated, and the typed InferenceRequest built from them."""
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmws_server.config import GenerationSettings, validate_generation
from llmws_server.errors import Refused

if TYPE_CHECKING:
    from llmws_server.core.tools import ToolUse

ROLES = {"system", "user", "assistant", "tool"}
TURN_FIELDS = {"user": {"role", "content"}, "system": {"role", "content"},
               "assistant": {"role", "content", "tool_calls"}, "tool": {"role", "content", "tool_call_id"}}
MAX_DEPTH = 16  # no valid message nests deeper than 4
# A big frame is text (prompts, images as base64 strings), not structure: with its strings emptied, no
# valid message comes near this many characters, while a frame of a million tiny arrays takes seconds to
# build and walk. The check is a C-speed regex, so a refused frame costs milliseconds.
MAX_STRUCTURE_CHARS = 65536
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800 to \udfff in JSON text


@dataclass(frozen=True)
class InferenceRequest:
    turns: list[dict]  # {"role", "content": text, "images"?: [encoded, or decoded once queued]}
    settings: GenerationSettings
    request_id: str | None
    raw_text: str | None = None  # a plain completion: this text continued as it is, with no chat template
    tools: "ToolUse | None" = None
    reasoning: bool = True  # a thinking model's <think>...</think> comes apart as reasoning


def parse_json(raw: str | bytes) -> dict:
    """A JSON object from text, refused when it is binary, malformed, too deep or too much structure."""
    if isinstance(raw, bytes):
        raise Refused("Binary frames are not supported: send JSON text")
    if len(raw) > MAX_STRUCTURE_CHARS and len(JSON_STRING.sub('""', raw)) > MAX_STRUCTURE_CHARS:
        raise Refused(f"Too many JSON values: a message's structure, strings aside, must stay under "
                      f"{MAX_STRUCTURE_CHARS} characters")
    try:
        message = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise Refused(f"Invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise Refused(f"Invalid JSON: {exc}") from None
    except RecursionError:
        raise Refused(f"JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(message, dict):
        raise Refused("A message must be a JSON object")
    _check_values(message, SURROGATE_ESCAPE.search(raw) is not None)
    return message


def _check_values(message: dict, escaped: bool) -> None:
    """Refuse nesting deeper than MAX_DEPTH and any key or string that is not Unicode text (a JSON escape
    such as \\ud800 gives a lone surrogate, which no encoder, tokenizer or socket takes), naming where.
    Without recursion. Text read as UTF-8 holds no surrogate: only an escape makes one, so strings are
    searched only when the frame has one (`escaped`)."""
    stack: list[tuple[dict | list, int, tuple]] = [(message, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise Refused(f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if escaped and isinstance(key, str) and not is_text(key):
                raise Refused(f"A field name in {_where(path)} is not valid Unicode text ({_shown(key)}: a lone "
                              "surrogate): send UTF-8 text", _where(path))
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, (*path, key)))
            elif escaped and isinstance(child, str) and not is_text(child):
                where = _where((*path, key))
                raise Refused(f"{where} is not valid Unicode text (it holds a lone surrogate): send UTF-8 text",
                              where)


def is_text(value: str) -> bool:
    """Whether a string is Unicode text: it encodes as UTF-8 (a lone surrogate does not)."""
    return SURROGATE.search(value) is None


def _where(path: tuple) -> str:
    """A field's place, as `messages[0].content`; "the message" for the top level."""
    shown = "".join(f"[{key}]" if isinstance(key, int) else f".{_shown(key)}" for key in path).lstrip(".")
    return shown or "the message"


def _shown(key: str) -> str:
    """A key safe to echo: a surrogate written as its escape."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _reject_constant(name: str) -> None:
    raise Refused(f"Invalid JSON: {name} is not allowed")


def settings_update(value: object, field: str) -> dict:
    """A validated generation-settings update; a bad one is refused whole, naming `field`."""
    if not isinstance(value, dict):
        raise Refused(f"{field} must be an object")
    try:
        return validate_generation(dict(value))
    except Refused as exc:
        raise Refused(f"{field}: {exc}") from None


def images_of(turns: list[dict]) -> list:
    """Every image of a conversation, in order."""
    return [image for turn in turns for image in turn.get("images", ())]


def image_list(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise Refused(f"{field} must be a list of images, each a data URL or base64 text")
    return list(value)


def check_turns(turns: object) -> list[dict]:
    """Chat messages [{"role", "content"}], content a string or OpenAI-style parts; an assistant turn may
    carry "tool_calls" (OpenAI's shape) and a "tool" turn answers one by its "tool_call_id"."""
    if not isinstance(turns, list) or not turns:
        raise Refused("messages must be a non-empty list")
    checked: list[dict] = []
    calls: set[str] = set()
    for index, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
                raise Refused(f"messages[{index}] must be an object with exactly role and content")
            raise Refused(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}")
        if not set(turn) <= TURN_FIELDS[role] or not ("content" in turn or turn.get("tool_calls")):
            extra = {"assistant": " (and tool_calls)", "tool": " (and tool_call_id)"}.get(role, "")
            raise Refused(f"messages[{index}] must be an object with exactly role and content{extra}")
        where = f"messages[{index}]"
        content = turn.get("content")
        if content is None and role == "assistant":  # a turn of tool calls alone
            content = ""
        if isinstance(content, str):
            checked.append({"role": role, "content": content})
        else:
            checked.append(_content_parts({**turn, "content": content}, where))
        if turn.get("tool_calls") is not None:
            checked[-1]["tool_calls"] = _tool_calls(turn["tool_calls"], f"{where}.tool_calls")
            calls.update(call["id"] for call in checked[-1]["tool_calls"])
        if role == "tool":
            if turn.get("tool_call_id") not in calls:
                raise Refused(f"{where}.tool_call_id matches no earlier tool call", f"{where}.tool_call_id")
            checked[-1]["tool_call_id"] = turn["tool_call_id"]
    return checked


def _tool_calls(value: object, where: str) -> list[dict]:
    """An assistant turn's calls: [{"id", "type": "function", "function": {"name", "arguments": text}}]."""
    if not isinstance(value, list):
        raise Refused(f"{where} must be a list", where)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(call.get("id"), str)
                and isinstance(function.get("name"), str) and isinstance(function.get("arguments", ""), str)):
            raise Refused(f'{where}[{index}] must be {{"id", "type": "function", "function": '
                          f'{{"name", "arguments"}}}}', f"{where}[{index}]")
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": function["name"], "arguments": function.get("arguments", "")}})
    return calls


def _content_parts(turn: dict, where: str) -> dict:
    """OpenAI-style content: a list of {"type": "text", "text"} and {"type": "image_url", "image_url":
    {"url"}} parts. The texts join in order; the images go before them."""
    parts = turn["content"]
    if not isinstance(parts, list) or not parts:
        raise Refused(f"{where}.content must be a string or a non-empty list of parts")
    texts, images = [], []
    for number, part in enumerate(parts):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
            texts.append(part["text"])
        elif kind == "image_url" and set(part) == {"type", "image_url"}:
            url = part["image_url"].get("url") if isinstance(part["image_url"], dict) else part["image_url"]
            images.append(image_list([url], f"{at}.image_url.url")[0])
        else:
            raise Refused(f'{at} must be {{"type": "text", "text": "..."}} or '
                          f'{{"type": "image_url", "image_url": {{"url": "data:image/..."}}}}')
    if images and turn["role"] != "user":
        raise Refused(f"{where}: only user turns may hold images")
    return {"role": turn["role"], "content": "".join(texts), **({"images": images} if images else {})}
