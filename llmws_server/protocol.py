"""The protocol in one place (docs/protocol.md): client frames parsed and validated into typed requests
before anything acts on them, and a builder for every message the server sends."""
import hashlib
import json
import re
from dataclasses import dataclass

from .config import GenerationSettings, validate_generation

FIELDS = {
    "inference": {"prompt", "messages", "images", "config", "request_id"},
    "config": {"data"},
    "ack": set(),
    "cancel": {"request_id"},
    "get_resources": set(),
    "list_models": set(),
    "switch_model": {"model_path", "request_id"},
    "download_model": {"repo", "target_dir", "file", "request_id"},
    "delete_model": {"model_name"},
    # the original LLMWS's
    "ping": set(),
    "get_status": set(),
    "recheck_model": set(),
    "train": {"dataset", "resume", "save_checkpoint", "checkpoint_name", "config", "request_id"},
    "train_status": set(),
    "save_snapshot": {"name", "request_id"},
}
ADMIN_TYPES = {"switch_model", "download_model", "delete_model", "recheck_model", "train", "save_snapshot"}  # model management: the admin scope
HELLO_FIELDS = {"session_id", "last_seq"}
ROLES = {"system", "user", "assistant"}
LEGACY_TAG = re.compile(r"<\|(system|user|assistant)\|>")
LEGACY_END = "<|end|>"
REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
MAX_DEPTH = 16  # no valid message nests deeper than 4
# A big frame is text (prompts, images as base64 strings), not structure: with its strings emptied, no
# valid message comes near this many characters, while a frame of a million tiny arrays takes seconds to
# build and walk. The check is a C-speed regex, so a refused frame costs milliseconds.
MAX_STRUCTURE_CHARS = 65536
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class ProtocolError(ValueError):
    """A frame that cannot be acted on; the message is sent back as an `error`, with `fields` beside it."""

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


class Busy(ProtocolError):
    """Refused for now, not for what it says: the server's or the session's queue is full."""


def parse_frame(raw) -> dict:
    if isinstance(raw, bytes):
        raise ProtocolError("Binary frames are not supported: send JSON text")
    if len(raw) > MAX_STRUCTURE_CHARS and len(JSON_STRING.sub('""', raw)) > MAX_STRUCTURE_CHARS:
        raise ProtocolError(f"Too many JSON values: a message's structure, strings aside, must stay under "
                            f"{MAX_STRUCTURE_CHARS} characters")
    try:
        message = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"Invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ProtocolError(f"Invalid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(message, dict):
        raise ProtocolError("A message must be a JSON object")
    if _depth(message) > MAX_DEPTH:
        raise ProtocolError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
    return message


def _depth(value) -> int:
    """How deeply containers nest, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _reject_constant(name):
    raise ProtocolError(f"Invalid JSON: {name} is not allowed")


def is_hello(message: dict) -> bool:
    """A frame without type is the hello, unless it carries a prompt: then it is an inference (as the
    original LLMWS reads one)."""
    return "type" not in message and "prompt" not in message and "messages" not in message


def parse_hello(message: dict) -> tuple[object, int]:
    """(requested session id, last seq seen). A bad session id is not an error: it gets a fresh session."""
    _no_extra_fields(message, HELLO_FIELDS, "hello")
    last_seq = message.get("last_seq", 0)
    if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
        raise ProtocolError("last_seq must be a whole number >= 0")
    return message.get("session_id"), last_seq


def check_message(message: dict) -> str:
    """The message's type, once its fields are known and of the right kind."""
    kind = message.get("type", None if is_hello(message) else "inference")
    if not isinstance(kind, str):
        raise ProtocolError("type must be a string")
    if kind not in FIELDS:
        shown = kind if len(kind) <= 40 else kind[:40] + "…"
        raise ProtocolError(f"Unknown message type: {shown!r} (known: {', '.join(FIELDS)})")
    _no_extra_fields(message, FIELDS[kind] | {"type"}, kind)
    if "request_id" in message and not (isinstance(message["request_id"], str)
                                        and REQUEST_ID.match(message["request_id"])):
        raise ProtocolError("request_id must be 1 to 128 letters, digits or . _ : -")
    return kind


def _no_extra_fields(message, allowed, kind):
    extra = sorted(set(message) - allowed)
    if extra:
        raise ProtocolError(f"Unknown field(s) for {kind}: {', '.join(extra)}")


@dataclass(frozen=True)
class InferenceRequest:
    turns: list[dict]  # see conversation()
    settings: GenerationSettings
    request_id: str | None
    raw_text: str | None = None  # a plain completion: this text continued as it is, with no chat template


def inference_request(message: dict, session_settings: dict) -> InferenceRequest:
    """An inference message checked whole: its conversation, and its settings over the session's."""
    turns = conversation(message)
    settings = {**session_settings, **settings_update(message.get("config", {}), "config")}
    return InferenceRequest(turns, GenerationSettings(**settings), message.get("request_id"))


def settings_update(value, field: str) -> dict:
    """A validated generation-settings update (config's data, inference's config); a bad one is refused whole."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{field} must be an object")
    try:
        return validate_generation(dict(value))
    except ValueError as exc:
        raise ProtocolError(f"{field}: {exc}") from None


def conversation(message: dict) -> list[dict]:
    """The chat messages of an inference request, from any of its three prompt forms. Each is
    {"role", "content": text} and, for a user turn with images, "images": [data URL or base64, ...]
    (still encoded: images.py decodes them)."""
    if ("prompt" in message) == ("messages" in message):
        raise ProtocolError("inference needs exactly one of prompt or messages")
    if "messages" in message:
        turns = _check_turns(message["messages"])
    elif isinstance(message["prompt"], str):
        turns = _legacy_turns(message["prompt"])
    else:
        turns = _prompt_turns(message["prompt"])
    if "images" in message:  # the original server's top-level list: it goes with the last user turn
        last_user = next((turn for turn in reversed(turns) if turn["role"] == "user"), None)
        if last_user is None:
            raise ProtocolError("images need a user turn to go with")
        last_user["images"] = last_user.get("images", []) + _image_list(message["images"], "images")
    return turns


def images_of(turns: list[dict]) -> list[str]:
    """Every image of a conversation, in order."""
    return [image for turn in turns for image in turn.get("images", ())]


def _prompt_turns(prompt) -> list[dict]:
    if not isinstance(prompt, dict):
        raise ProtocolError("prompt must be an object {system, user, images?} or a string")
    _no_extra_fields(prompt, {"system", "user", "images"}, "prompt")
    if not isinstance(prompt.get("user"), str) or not prompt["user"]:
        raise ProtocolError("prompt.user must be a non-empty string")
    if not isinstance(prompt.get("system", ""), str):
        raise ProtocolError("prompt.system must be a string")
    turns = [{"role": "system", "content": prompt["system"]}] if prompt.get("system") else []
    user = {"role": "user", "content": prompt["user"]}
    if "images" in prompt:
        user["images"] = _image_list(prompt["images"], "prompt.images")
    return turns + [user]


def _image_list(value, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ProtocolError(f"{field} must be a list of images, each a data URL or base64 text")
    return list(value)


def _legacy_turns(text: str) -> list[dict]:
    """'<|system|>…<|end|><|user|>…<|end|>'; a string without tags is the user's text. Linear time: each
    piece between two end tags is searched once, and a turn is its first tag to the end tag."""
    turns = []
    for piece in text.split(LEGACY_END)[:-1]:
        tag = LEGACY_TAG.search(piece)
        if tag:
            turns.append({"role": tag.group(1), "content": piece[tag.end():].strip()})
    if not turns:
        turns = [{"role": "user", "content": text}]
    if not any(turn["content"] for turn in turns if turn["role"] == "user"):
        raise ProtocolError("prompt has no user text")
    return turns


def _check_turns(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ProtocolError("messages must be a non-empty list")
    checked = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise ProtocolError(f"messages[{index}] must be an object with exactly role and content")
        if not isinstance(turn["role"], str) or turn["role"] not in ROLES:
            raise ProtocolError(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}")
        if isinstance(turn["content"], str):
            checked.append({"role": turn["role"], "content": turn["content"]})
        else:
            checked.append(_content_parts(turn, f"messages[{index}]"))
    return checked


def _content_parts(turn: dict, where: str) -> dict:
    """OpenAI-style content: a list of {"type": "text", "text"} and {"type": "image_url", "image_url":
    {"url"}} parts. The texts join in order; the images go before them."""
    parts = turn["content"]
    if not isinstance(parts, list) or not parts:
        raise ProtocolError(f"{where}.content must be a string or a non-empty list of parts")
    texts, images = [], []
    for number, part in enumerate(parts):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
            texts.append(part["text"])
        elif kind == "image_url" and set(part) == {"type", "image_url"}:
            url = part["image_url"].get("url") if isinstance(part["image_url"], dict) else part["image_url"]
            images.append(_image_list([url], f"{at}.image_url.url")[0])
        else:
            raise ProtocolError(f'{at} must be {{"type": "text", "text": "..."}} or '
                                f'{{"type": "image_url", "image_url": {{"url": "data:image/..."}}}}')
    if images and turn["role"] != "user":
        raise ProtocolError(f"{where}: only user turns may hold images")
    return {"role": turn["role"], "content": "".join(texts), **({"images": images} if images else {})}



# -- what the server sends ---------------------------------------------------------------------------
# A request's messages get its request_id when they are emitted (jobs.Job.emit); the session adds seq.

def welcome(session_id: str, resumed: bool, model: str, capabilities: dict, resources: dict, training: dict) -> dict:
    return {"type": "welcome", "session_id": session_id, "resumed": resumed, "model": model,
            "capabilities": capabilities, "resources": resources, "training": training}


def log(text: str) -> dict:
    return {"type": "log", "message": text}


def error(text: str, **fields) -> dict:
    return {"type": "error", "message": text, **fields}


def queued(position: int) -> dict:
    return {"type": "queued", "position": position}


def start(tokens_in: int, max_tokens: int, images_in: int, sampled: bool) -> dict:
    """do_sample (whether it samples) and multimodal (it has images) as the original LLMWS says them."""
    return {"type": "start", "tokens_in": tokens_in, "max_tokens": max_tokens, "images_in": images_in,
            "do_sample": sampled, "multimodal": images_in > 0}


def token(text: str) -> dict:
    return {"type": "token", "data": text}


def done(generated: int, reason: str, elapsed_s: float) -> dict:
    """The stream's last message: tokens generated, why it ended, and the rate over `elapsed_s`."""
    return {"type": "done", "total_tokens": generated, "finish_reason": reason,
            "tokens_per_s": round(generated / max(elapsed_s, 1e-9), 2)}


def context_too_long(tokens_in: int, max_context: int) -> dict:
    return error(f"Context too long ({tokens_in} tokens). Max: {max_context}. Please retry with shorter input.",
                 max_context=max_context, input_length=tokens_in)


def config_ack(settings: dict) -> dict:
    return {"type": "config_ack", "config": dict(settings)}


def ack_received() -> dict:
    return {"type": "ack_received"}


def fingerprint(message: dict) -> str:
    """A frame's content, to know the same frame sent again."""
    return hashlib.sha256(json.dumps(message, sort_keys=True).encode()).hexdigest()


def cancelled(request_id: str) -> dict:
    return {"type": "cancelled", "request_id": request_id}


def resources(cuda, cpu: dict, model: dict, available_models: list) -> dict:
    return {"type": "resources", "cuda": cuda, "cpu": cpu, "model": model, "available_models": available_models}


def models_list(models: list) -> dict:
    return {"type": "models_list", "models": models}


def model_switched(name: str, status: dict) -> dict:
    return {"type": "model_switched", "message": f"Model switched to {name}", "model": name, "status": status}


def recheck_complete(success: bool, status: dict, outcome: str) -> dict:
    """outcome (added): "unchanged", or "reloaded" when the folder's files had changed."""
    return {"type": "recheck_complete", "success": success, "status": status, "outcome": outcome}


def pong() -> dict:
    return {"type": "pong"}


def status(model: dict, memory, sessions: int, training: dict) -> dict:
    return {"type": "status", "model": model, "memory": memory, "sessions": sessions, "training": training}


def train_started(settings: dict, examples: int, checkpoint_name: str) -> dict:
    return {"type": "train_started", "config": settings, "examples": examples, "checkpoint_name": checkpoint_name}


def train_progress(step: int, max_steps: int, loss: float, learning_rate: float, tokens_per_s: float) -> dict:
    return {"type": "train_progress", "step": step, "max_steps": max_steps, "loss": round(loss, 5),
            "learning_rate": learning_rate, "tokens_per_s": round(tokens_per_s, 1)}


def train_checkpoint(step: int, path: str) -> dict:
    return {"type": "train_checkpoint", "step": step, "path": path}


def train_done(steps: int, checkpoint: str | None, reason: str, loss: float | None) -> dict:
    """reason (added): "done", or "cancelled" (nothing is saved then)."""
    return {"type": "train_done", "steps": steps, "checkpoint": checkpoint, "finish_reason": reason, "loss": loss}


def train_status(training: dict) -> dict:
    return {"type": "train_status", "training": training}


def snapshot_saved(path: str) -> dict:
    return {"type": "snapshot_saved", "path": path}


def download_started() -> dict:
    return {"type": "download_started", "message": "Download started in background"}


def download_done(entry: dict) -> dict:
    return {"type": "download_done", "model": entry}


def model_deleted(name: str) -> dict:
    return {"type": "model_deleted", "message": f"Model {name} deleted"}
