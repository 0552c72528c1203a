"""The seed protocol in one place (docs/protocol.md): client frames validated into typed requests before
anything acts on them, and a builder for every message the server sends (ws/wire.py turns the core's
events into them)."""
import hashlib
import json
import re
from dataclasses import replace

from llmws_server.config import GenerationSettings
from llmws_server.core.requests import InferenceRequest, check_turns, image_list, settings_update
from llmws_server.core.tools import checked_tools, response_schema
from llmws_server.errors import Refused

FIELDS = {
    "inference": {"prompt", "messages", "images", "config", "request_id", "tools", "tool_choice", "response_format",
                  "logprobs"},
    "config": {"data"},
    "ack": set(),
    "cancel": {"request_id"},
    "get_resources": set(),
    "list_models": set(),
    "switch_model": {"model_path", "request_id"},
    "download_model": {"repo", "target_dir", "file", "request_id"},
    "delete_model": {"model_name"},
    "embed": {"input", "request_id"},
    # the original LLMWS's
    "ping": set(),
    "get_status": set(),
    "recheck_model": set(),
    "train": {"dataset", "resume", "save_checkpoint", "checkpoint_name", "config", "request_id"},
    "train_status": set(),
    "save_snapshot": {"name", "request_id"},
}
# Model management: the admin scope
ADMIN_TYPES = {"switch_model", "download_model", "delete_model", "recheck_model", "train", "save_snapshot"}
HELLO_FIELDS = {"session_id", "last_seq"}
LEGACY_TAG = re.compile(r"<\|(system|user|assistant)\|>")
LEGACY_END = "<|end|>"
REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")


def is_hello(message: dict) -> bool:
    """A frame without type is the hello, unless it carries a prompt: then it is an inference (as the
    original LLMWS reads one)."""
    return "type" not in message and "prompt" not in message and "messages" not in message


def parse_hello(message: dict) -> tuple[object, int]:
    """(requested session id, last seq seen). A bad session id is not an error: it gets a fresh session."""
    _no_extra_fields(message, HELLO_FIELDS, "hello")
    last_seq = message.get("last_seq", 0)
    if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
        raise Refused("last_seq must be a whole number >= 0")
    return message.get("session_id"), last_seq


def check_message(message: dict) -> str:
    """The message's type, once its fields are known and of the right kind."""
    kind = message.get("type", None if is_hello(message) else "inference")
    if not isinstance(kind, str):
        raise Refused("type must be a string")
    if kind not in FIELDS:
        shown = kind if len(kind) <= 40 else kind[:40] + "…"
        raise Refused(f"Unknown message type: {shown!r} (known: {', '.join(FIELDS)})")
    _no_extra_fields(message, FIELDS[kind] | {"type"}, kind)
    if "request_id" in message and not (isinstance(message["request_id"], str)
                                        and REQUEST_ID.match(message["request_id"])):
        raise Refused("request_id must be 1 to 128 letters, digits or . _ : -")
    return kind


def _no_extra_fields(message: dict, allowed: set[str], kind: str) -> None:
    extra = sorted(set(message) - allowed)
    if extra:
        raise Refused(f"Unknown field(s) for {kind}: {', '.join(extra)}")


def inference_request(message: dict, session_settings: dict) -> InferenceRequest:
    """An inference message checked whole: its conversation, its settings over the session's, and its
    tools and response format (OpenAI's shapes: core/tools.py)."""
    turns = conversation(message)
    settings = GenerationSettings(**{**session_settings, **settings_update(message.get("config", {}), "config")})
    tools = checked_tools(message.get("tools"), message.get("tool_choice"))
    schema = response_schema(message.get("response_format"))
    if tools is not None and tools.constrained:
        if schema is not None:
            raise Refused("response_format and a required tool call cannot both shape the answer")
        schema = tools.schema()
    logprobs = message.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= 20):
        raise Refused("logprobs must be a whole number from 0 to 20 (how many likeliest tokens to show)")
    settings = replace(settings, json_schema=schema, logprobs=logprobs)
    return InferenceRequest(turns, settings, message.get("request_id"), tools=tools)


def conversation(message: dict) -> list[dict]:
    """The chat messages of an inference request, from any of its three prompt forms. Each is
    {"role", "content": text} and, for a user turn with images, "images": [data URL or base64, ...]
    (still encoded: images.py decodes them)."""
    if ("prompt" in message) == ("messages" in message):
        raise Refused("inference needs exactly one of prompt or messages")
    if "messages" in message:
        turns = check_turns(message["messages"])
    elif isinstance(message["prompt"], str):
        turns = _legacy_turns(message["prompt"])
    else:
        turns = _prompt_turns(message["prompt"])
    if "images" in message:  # the original server's top-level list: it goes with the last user turn
        last_user = next((turn for turn in reversed(turns) if turn["role"] == "user"), None)
        if last_user is None:
            raise Refused("images need a user turn to go with")
        last_user["images"] = last_user.get("images", []) + image_list(message["images"], "images")
    return turns


def _prompt_turns(prompt: object) -> list[dict]:
    if not isinstance(prompt, dict):
        raise Refused("prompt must be an object {system, user, images?} or a string")
    _no_extra_fields(prompt, {"system", "user", "images"}, "prompt")
    if not isinstance(prompt.get("user"), str) or not prompt["user"]:
        raise Refused("prompt.user must be a non-empty string")
    if not isinstance(prompt.get("system", ""), str):
        raise Refused("prompt.system must be a string")
    turns = [{"role": "system", "content": prompt["system"]}] if prompt.get("system") else []
    user = {"role": "user", "content": prompt["user"]}
    if "images" in prompt:
        user["images"] = image_list(prompt["images"], "prompt.images")
    return turns + [user]


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
        raise Refused("prompt has no user text")
    return turns


# -- what the server sends ---------------------------------------------------------------------------
# A request's messages get its request_id when they are emitted (jobs.Job.emit); the session adds seq.

def welcome(session_id: str, resumed: bool, model: str, capabilities: dict, resources: dict, training: dict) -> dict:
    return {"type": "welcome", "session_id": session_id, "resumed": resumed, "model": model,
            "capabilities": capabilities, "resources": resources, "training": training}


def log(text: str) -> dict:
    return {"type": "log", "message": text}


def error(text: str, **fields: object) -> dict:
    return {"type": "error", "message": text, **fields}


def queued(position: int) -> dict:
    return {"type": "queued", "position": position}


def start(tokens_in: int, max_tokens: int, images_in: int, sampled: bool) -> dict:
    """do_sample (whether it samples) and multimodal (it has images) as the original LLMWS says them."""
    return {"type": "start", "tokens_in": tokens_in, "max_tokens": max_tokens, "images_in": images_in,
            "do_sample": sampled, "multimodal": images_in > 0}


def token(text: str, logprobs: list | None = None) -> dict:
    """logprobs (added, when the request asked): [{"token", "logprob", "top_logprobs": [[token, logprob]]}]."""
    return {"type": "token", "data": text, **({"logprobs": logprobs} if logprobs else {})}


def reasoning(text: str) -> dict:
    """Added: what a thinking model writes inside <think>...</think>, apart from the answer."""
    return {"type": "reasoning", "data": text}


def tool_call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> dict:
    """Added: a tool call as it streams. The first message of a call has its id and name; the arguments
    (JSON text) come in pieces that concatenate to the whole."""
    head = {"id": call_id, "name": name} if call_id is not None else {}
    return {"type": "tool_call", "index": index, **head, "arguments": arguments}


def done(generated: int, reason: str, tokens_per_s: float) -> dict:
    """The stream's last message: tokens generated, why it ended, and the rate."""
    return {"type": "done", "total_tokens": generated, "finish_reason": reason, "tokens_per_s": tokens_per_s}


def config_ack(settings: dict) -> dict:
    return {"type": "config_ack", "config": dict(settings)}


def ack_received() -> dict:
    return {"type": "ack_received"}


def fingerprint(message: dict) -> str:
    """A frame's content, to know the same frame sent again."""
    return hashlib.sha256(json.dumps(message, sort_keys=True).encode()).hexdigest()


def cancelled(request_id: str) -> dict:
    return {"type": "cancelled", "request_id": request_id}


def resources(cuda: dict | None, cpu: dict, model: dict, available_models: list) -> dict:
    return {"type": "resources", "cuda": cuda, "cpu": cpu, "model": model, "available_models": available_models}


def models_list(models: list) -> dict:
    return {"type": "models_list", "models": models}


def model_switched(name: str, status: dict) -> dict:
    return {"type": "model_switched", "message": f"Model switched to {name}", "model": name, "status": status}


def recheck_complete(success: bool, status: dict, outcome: str) -> dict:
    """outcome (added): "unchanged", or "reloaded" when the folder's files had changed."""
    return {"type": "recheck_complete", "success": success, "status": status, "outcome": outcome}


def embeddings(vectors: list[list[float]], tokens: int, model: str, request_id: str | None) -> dict:
    tag = {"request_id": request_id} if request_id else {}
    return {"type": "embeddings", **tag, "model": model, "data": vectors, "tokens": tokens}


def pong() -> dict:
    return {"type": "pong"}


def status(model: dict, memory: dict | None, sessions: int, training: dict) -> dict:
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
