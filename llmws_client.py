"""The LLMWS Python API: an async client that reconnects and resumes by itself (llmws_session.py).

    from llm import LLMWSEnhancedClient   (llm.py re-exports it, as the seed imports it)
"""
import asyncio
import base64
import uuid
from pathlib import Path

from llmws_session import LLMWSError, ResumingSession

__all__ = ["Answer", "LLMWSEnhancedClient", "LLMWSError", "image_data_url"]


class Answer(str):
    """An answer from `inference()`: its text (a str, as before) and what came beside it.

    - `tool_calls`: the tools the answer called, in order: [{"id": "call_…", "name": "get_weather",
      "arguments": '{"city": "Paris"}'}] (arguments as the JSON text the model wrote); [] when it called none.
      `finish_reason` is then "tool_calls" and the text is usually "".
    - `reasoning`: what a thinking model wrote in its <think> block ("" when none).
    - `finish_reason`: "stop", "length", "tool_calls", "cancelled" or "timeout".
    - `logprobs`: with `logprobs=N`, one {"token", "logprob", "top_logprobs": [[token, logprob], …]} per token.
    """

    tool_calls: list[dict]
    reasoning: str
    finish_reason: str | None
    logprobs: list[dict]

    def __new__(cls, text: str = "", tool_calls=None, reasoning: str = "", finish_reason=None, logprobs=None):
        answer = super().__new__(cls, text)
        answer.tool_calls = list(tool_calls or [])
        answer.reasoning = reasoning
        answer.finish_reason = finish_reason
        answer.logprobs = list(logprobs or [])
        return answer

    def as_message(self) -> dict:
        """The answer as an assistant turn for the next request's `messages` (OpenAI's shape): follow it
        with {"role": "tool", "tool_call_id": call["id"], "content": result} for each call."""
        turn: dict = {"role": "assistant", "content": str(self)}
        if self.tool_calls:
            turn["content"] = str(self) or None
            turn["tool_calls"] = [{"id": call["id"], "type": "function",
                                   "function": {"name": call["name"], "arguments": call["arguments"]}}
                                  for call in self.tool_calls]
        return turn


class LLMWSEnhancedClient(ResumingSession):
    """Async client for one session: chat, settings, models, training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_tool_calls: list[dict] = []  # the latest answer's tool calls, as Answer.tool_calls
        self.last_reasoning = ""  # the latest answer's thinking text
        self.last_logprobs: list[dict] = []  # the latest answer's per-token log probabilities (with logprobs=N)

    async def stream(self, prompt=None, system=None, messages=None, images=None, *, tools=None, tool_choice=None,
                     response_format=None, logprobs=None, **config):
        """Yield the answer's text pieces as they arrive. Queue positions go to `on_status`. `images` (paths
        or bytes) go with the prompt, or with the last user turn of `messages`.

        `tools` (OpenAI function tools), `tool_choice` ("auto", "none", "required" or {"type": "function",
        "function": {"name": …}}), `response_format` ({"type": "json_object"} or {"type": "json_schema",
        "json_schema": {"name", "schema"}}) and `logprobs` (0 to 20) go in the frame; other keywords
        (temperature, seed, frequency_penalty, …) in its config. What is not text is kept as it comes:
        `last_tool_calls`, `last_reasoning` and `last_logprobs` (as Answer's) are this stream's from its
        start, and `last_done` its `done` once it ends."""
        message = inference_frame(prompt, system, messages, images, tools, tool_choice, response_format, logprobs,
                                  config)
        async for piece in self._pieces(message, Answer()):
            yield piece

    async def inference(self, prompt=None, system=None, messages=None, on_token=None, images=None, *, tools=None,
                        tool_choice=None, response_format=None, logprobs=None, **config) -> Answer:
        """The whole answer, an `Answer`: a str of its text, with `.tool_calls` (the calls it made, [] for a
        plain answer), `.reasoning`, `.finish_reason` and `.logprobs`. `on_token(text)` sees each piece of
        text as it arrives. The keywords are stream()'s."""
        message = inference_frame(prompt, system, messages, images, tools, tool_choice, response_format, logprobs,
                                  config)
        extras = Answer()
        pieces = []
        async for piece in self._pieces(message, extras):
            pieces.append(piece)
            if on_token:
                on_token(piece)
        return Answer("".join(pieces), extras.tool_calls, extras.reasoning, extras.finish_reason, extras.logprobs)

    async def _pieces(self, message: dict, extras: Answer):
        """Send an inference frame and yield its text; its tool calls, reasoning, log probabilities and
        finish reason go into `extras` as they come (and are this client's last_* meanwhile)."""
        self.last_tool_calls, self.last_logprobs = extras.tool_calls, extras.logprobs
        self.last_reasoning = ""
        reasoning: list[str] = []
        request_id = message["request_id"]
        stream = self._streams[request_id] = asyncio.Queue()
        try:
            item = (await self._send_and_wait(message, stream))[0]
            if "seq" not in item:  # a direct answer to an inference is a refusal (bad field, Queue full)
                raise LLMWSError(item)
            while True:
                if item["type"] == "token":
                    extras.logprobs.extend(item.get("logprobs", ()))
                    yield item["data"]
                elif item["type"] == "tool_call":
                    add_tool_call(extras.tool_calls, item)
                elif item["type"] == "reasoning":
                    reasoning.append(item["data"])
                    extras.reasoning = "".join(reasoning)
                    if self.last_tool_calls is extras.tool_calls:  # still the latest stream
                        self.last_reasoning = extras.reasoning
                elif item["type"] == "queued":
                    self.on_status(f"queued: {item['position']} ahead")
                elif item["type"] == "error":
                    raise LLMWSError(item)
                elif item["type"] == "done":
                    self.last_done = item
                    extras.finish_reason = item.get("finish_reason")
                    break
                item = await self._next(stream)  # a type this client does not know (a newer server's) is passed over
        finally:
            del self._streams[request_id]
        if not self._streams:  # nothing else in flight: the server may drop the buffer
            await self.ack()

    async def set_config(self, **settings) -> dict:
        return (await self._ask({"type": "config", "data": settings}, "config_ack"))["config"]

    async def get_resources(self) -> dict:
        return await self._ask({"type": "get_resources"}, "resources")

    async def list_models(self) -> list:
        return (await self._ask({"type": "list_models"}, "models_list"))["models"]

    async def cancel(self, request_id=None) -> dict:
        message = {"type": "cancel", **({"request_id": request_id} if request_id else {})}
        return await self._ask(message, "cancelled")

    async def ack(self) -> dict:
        return await self._ask({"type": "ack"}, "ack_received")

    async def delete_model(self, name: str) -> dict:
        return await self._ask({"type": "delete_model", "model_name": name}, "model_deleted")

    async def switch_model(self, path: str, on_log=None) -> dict:
        message = {"type": "switch_model", "model_path": path, "request_id": str(uuid.uuid4())}
        return await self._run_job(message, "model_switched", logs_to(on_log))

    async def download_model(self, repo: str, target_dir: str, on_log=None, file: str | None = None) -> dict:
        """The whole repo, or only its GGUF file `file` (a model for the llama.cpp engine)."""
        message = {"type": "download_model", "repo": repo, "target_dir": target_dir, "request_id": str(uuid.uuid4())}
        if file:
            message["file"] = file
        return await self._run_job(message, "download_done", logs_to(on_log))

    async def train(self, dataset: str, checkpoint_name=None, on_event=None, **config) -> dict:
        """LoRA training on the served model (admin scope): `dataset` is JSONL text. `on_event` sees
        train_started, train_progress and train_checkpoint; returns train_done (its checkpoint is the saved
        model's path, for switch_model)."""
        request_id = str(uuid.uuid4())
        message = {"type": "train", "request_id": request_id, "dataset": dataset, "config": config,
                   **({"checkpoint_name": checkpoint_name} if checkpoint_name else {})}
        return await self._run_job(message, "train_done", on_event)

    async def save_snapshot(self, name: str) -> dict:
        """The served model saved as var/models/NAME (admin scope)."""
        message = {"type": "save_snapshot", "name": name, "request_id": str(uuid.uuid4())}
        return await self._run_job(message, "snapshot_saved", None)

    async def train_status(self) -> dict:
        return (await self._ask({"type": "train_status"}, "train_status"))["training"]

    async def _run_job(self, message: dict, final_type: str, on_event) -> dict:
        """A job with a request_id: its numbered messages go to `on_event` until `final_type`."""
        stream = self._streams[message["request_id"]] = asyncio.Queue()
        try:
            return await self._until(message, stream, final_type, on_event)
        finally:
            del self._streams[message["request_id"]]

    async def _until(self, message: dict, queue: asyncio.Queue, final_type: str, on_event) -> dict:
        """Send `message`; hand what comes on `queue` to `on_event` (queue positions to on_status) until
        `final_type`, which is returned; an error raises LLMWSError."""
        ready = await self._send_and_wait(message, queue)
        while True:
            event = ready.pop(0) if ready else await self._next(queue)
            if event["type"] == "error":
                raise LLMWSError(event)
            if event["type"] == final_type:
                return event
            if event["type"] == "queued":
                self.on_status(f"queued: {event['position']} ahead")
            elif on_event:
                on_event(event)


def inference_frame(prompt, system, messages, images, tools, tool_choice, response_format, logprobs,
                    config: dict) -> dict:
    """An inference frame with a fresh request_id (a retry after a cut sends the same frame again)."""
    message: dict = {"type": "inference", "request_id": str(uuid.uuid4())}
    if messages is not None:
        message["messages"] = messages
    else:
        message["prompt"] = {"system": system, "user": prompt} if system else {"user": prompt}
    if images:
        message["images"] = [image_data_url(image) for image in images]
    for field, value in (("tools", tools), ("tool_choice", tool_choice), ("response_format", response_format),
                         ("logprobs", logprobs)):
        if value is not None:
            message[field] = value
    if config:
        message["config"] = config
    return message


def add_tool_call(calls: list[dict], message: dict) -> None:
    """Fold a `tool_call` message into the calls so far: the first of a call (with id and name) opens it at
    its index, the others add their piece to its arguments."""
    index = message["index"]
    while len(calls) <= index:
        calls.append({"id": None, "name": None, "arguments": ""})
    call = calls[index]
    if "id" in message:
        call["id"], call["name"] = message["id"], message["name"]
    call["arguments"] += message.get("arguments", "")


def logs_to(on_log):
    """An on_event for a long task (switch, download) that hands its log lines to `on_log`."""
    return lambda event: on_log and event["type"] == "log" and on_log(event["message"])


IMAGE_TYPES = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"GIF8": "gif", b"RIFF": "webp", b"BM": "bmp"}


def image_data_url(image) -> str:
    """A data URL of an image file's path or of its bytes (a data URL passes as it is)."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    data = image if isinstance(image, bytes) else Path(image).expanduser().read_bytes()
    kind = next((name for magic, name in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if kind is None:
        raise ValueError(f"{image if not isinstance(image, bytes) else 'the bytes'} is not a PNG, JPEG, GIF, WebP "
                         "or BMP image")
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
