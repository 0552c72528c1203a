"""One engine replica, in a Ray actor's process: the engine (engines.api.Engine) loaded there, driven
through plain method calls by its RemoteEngine on the server (remote.py). Its batch's progress and a solo
request's text stream back as Ray streaming generators.

The actor is threaded (ray.remote max_concurrency > 1): the streams run while add, cancel and stop calls
come in; the engine's own batch takes calls from any thread.
"""
import logging
import os
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmws_server.config import Config, GenerationSettings
from llmws_server.engines.api import Batch, Progress, Prompt

STREAM_WAIT_S = 0.05  # how long the batch's stream waits for progress before it looks whether to end


@dataclass(frozen=True)
class Described:
    """What the server keeps of a replica: the engine's attributes, and where it runs."""
    name: str
    path: Path
    vision: bool
    max_context: int
    params: int
    device: str
    dtype_name: str
    chat_template: str | None
    capabilities: dict
    batch_size: int
    batches_images: bool  # engine.batchable(1): whether a request with images shares the batch
    batches: bool  # engine.batchable(0)
    node: str
    pid: int


@dataclass(frozen=True)
class BatchFailed:
    """The last item of a batch's stream when the batch died (its message for the requests it held)."""
    text: str


class Replica:
    def __init__(self, folder: Path, config: Config):
        from llmws_server.engines.registry import load_engine  # the engines' imports, in this process only

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if not Path(folder).exists():  # only the code travels to the nodes, not the weights
            raise FileNotFoundError(f"{folder} is not on this node ({socket.gethostname()}): every node needs the "
                                    "model folder at the same path as the server")
        self.engine = load_engine(folder, config)
        self.batch: Batch | None = None
        self.solo_stop: str | None = None  # why the solo request must stop, once the server says so

    def describe(self) -> Described:
        import ray

        engine = self.engine
        return Described(engine.name, engine.path, engine.vision, engine.max_context, engine.params, engine.device,
                         engine.dtype_name, engine.chat_template, engine.capabilities(), engine.batch_size(),
                         engine.batchable(1), engine.batchable(0), ray.get_runtime_context().get_node_id(),
                         os.getpid())

    def encode(self, messages: list[dict], tools: list[dict] | None) -> Prompt:
        return self.engine.encode(messages, tools)

    def encode_text(self, text: str) -> Prompt:
        return self.engine.encode_text(text)

    def embed(self, inputs: list) -> tuple[list[list[float]], int]:
        return self.engine.embed(inputs)

    def open_batch(self, slots: int) -> None:
        self.close_batch()
        self.batch = self.engine.open_batch(slots)

    def add(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> str:
        assert self.batch is not None
        return self.batch.add(prompt, max_tokens, settings)

    def cancel(self, request: str) -> None:
        if self.batch is not None:
            self.batch.cancel(request)

    def stream(self) -> Iterator[list[Progress] | BatchFailed]:
        """The open batch's progress as it comes, until the batch is closed or dies."""
        batch = self.batch
        while batch is not None and batch is self.batch:
            failure = batch.failure()
            if failure is not None:
                yield BatchFailed(failure)
                return
            progress = batch.progress(STREAM_WAIT_S)
            if progress:
                yield progress

    def close_batch(self) -> None:
        batch, self.batch = self.batch, None
        if batch is not None:
            batch.close()

    def generate(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int) -> Iterator[tuple]:
        """A request alone (engine.generate): ("text", text, logprobs) pieces, then ("end", tokens, reason)."""
        pieces: queue.Queue[tuple] = queue.Queue()
        self.solo_stop = None

        def run() -> None:
            try:
                tokens, reason = self.engine.generate(prompt, settings, max_new_tokens,
                                                      lambda text, logprobs: pieces.put(("text", text, logprobs)),
                                                      lambda: self.solo_stop)
                pieces.put(("end", tokens, reason))
            except BaseException as exc:
                pieces.put(("raised", exc))

        threading.Thread(target=run, name="llmws-solo", daemon=True).start()
        while True:
            piece = pieces.get()
            if piece[0] == "raised":
                raise piece[1]
            yield piece
            if piece[0] == "end":
                return

    def stop_solo(self, reason: str) -> None:
        self.solo_stop = reason

    def free_memory(self) -> None:
        self.engine.free_memory()

    def lower_max_context(self, failed_at: int) -> int:
        self.engine.lower_max_context(failed_at)
        return self.engine.max_context
