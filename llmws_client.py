"""The LLMWS Python API: an async client that reconnects and resumes by itself (llmws_session.py).

    from llm import LLMWSEnhancedClient   (llm.py re-exports it, as the seed imports it)
"""
import asyncio
import base64
import uuid
from pathlib import Path

from llmws_session import LLMWSError, ResumingSession

__all__ = ["LLMWSEnhancedClient", "LLMWSError", "image_data_url"]


class LLMWSEnhancedClient(ResumingSession):
    """Async client for one session: chat, settings, models, training."""

    async def stream(self, prompt=None, system=None, messages=None, images=None, **config):
        """Yield the answer's text pieces as they arrive. Queue positions go to `on_status`. `images` (paths
        or bytes) go with the prompt, or with the last user turn of `messages`."""
        request_id = str(uuid.uuid4())
        message = {"type": "inference", "request_id": request_id}
        if messages is not None:
            message["messages"] = messages
        else:
            message["prompt"] = {"system": system, "user": prompt} if system else {"user": prompt}
        if images:
            message["images"] = [image_data_url(image) for image in images]
        if config:
            message["config"] = config
        stream = self._streams[request_id] = asyncio.Queue()
        try:
            item = (await self._send_and_wait(message, stream))[0]
            if "seq" not in item:  # a direct answer to an inference is a refusal (bad field, Queue full)
                raise LLMWSError(item)
            while True:
                if item["type"] == "token":
                    yield item["data"]
                elif item["type"] == "queued":
                    self.on_status(f"queued: {item['position']} ahead")
                elif item["type"] == "error":
                    raise LLMWSError(item)
                elif item["type"] == "done":
                    self.last_done = item
                    break
                item = await self._next(stream)
        finally:
            del self._streams[request_id]
        if not self._streams:  # nothing else in flight: the server may drop the buffer
            await self.ack()

    async def inference(self, prompt=None, system=None, messages=None, on_token=None, images=None, **config) -> str:
        """The whole answer; `on_token(text)` sees each piece as it arrives."""
        pieces = []
        async for piece in self.stream(prompt, system, messages, images, **config):
            pieces.append(piece)
            if on_token:
                on_token(piece)
        return "".join(pieces)

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
