"""What the worker and the batching scheduler need from an engine, in plain Python: token ids, text,
numbers. It knows nothing about sessions, sockets or HTTP. The transformers engine (engines/transformers/)
and the llama.cpp engine (engines/llamacpp/) implement it; another engine (vLLM) is one more folder with
the same methods and one line in engines/registry.py, and nothing above it changes.

Only the worker thread calls into an engine.
"""
import queue
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Container, Protocol

from llmws_server.config import GenerationSettings


@dataclass
class Prompt:
    """A conversation made ready for the model: its token ids (image tokens included) and, for images,
    the engine's other inputs (pixel values and the like), which only the engine reads."""
    ids: list[int]
    images: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's natural-log probability in the distribution it was drawn from (after
    temperature, top-k and top-p), and the likeliest tokens there, best first."""
    token: str  # its text
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Progress:
    """What one request in a batch produced since the last look."""
    request: str  # the name Batch.add gave it
    text: str  # new text, whole characters only
    tokens: int  # tokens generated so far
    finished: bool
    error: str | None = None  # the request failed: the message for its client
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last look, when settings.logprobs is set


class Batch(Protocol):
    """Requests generating together; added and cancelled one by one while the others go on."""

    def add(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> str:
        """Start a request; returns its name in this batch."""

    def cancel(self, request: str) -> None:
        """Stop a request; nothing more is reported for it."""

    def progress(self, timeout: float) -> list[Progress]:
        """What the requests produced, waiting at most `timeout` seconds for the first of it."""

    def failure(self) -> str | None:
        """None while the batch runs; once it has died, the message for the requests it held."""

    def close(self) -> None:
        """Stop generating and free the batch's memory."""


def queued_progress(results: "queue.Queue[Progress]", timeout: float, cancelled: Container[str]) -> list[Progress]:
    """Batch.progress of a batch whose thread puts its Progress on a queue: all there is, waiting at most
    `timeout` seconds for the first, without the cancelled requests'."""
    try:
        found = [results.get(timeout=timeout)]
    except queue.Empty:
        return []
    while not results.empty():
        found.append(results.get_nowait())
    return [item for item in found if item.request not in cancelled]


class TrainingSettings(Protocol):
    """What an engine's training reads of its settings (core.training.TrainSettings, which engines do not
    import)."""

    @property
    def max_seq_length(self) -> int: ...

    @property
    def learning_rate(self) -> float: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def gradient_accumulation(self) -> int: ...


class Trainer(Protocol):
    """Used as a context manager: training happens between entering and leaving it."""

    def __enter__(self) -> "Trainer":
        """Set up training (the adapters go in)."""

    def __exit__(self, *exc_info: object) -> None:
        """End training; the served model is as it was."""

    def step(self) -> tuple[float, int]:
        """One batch forward and back: (loss, tokens)."""

    def save(self, folder: Path) -> None:
        """The model as trained so far, merged, as a model folder."""


class Engine(Protocol):
    name: str
    path: Path
    vision: bool  # takes images
    max_context: int  # tokens in and out, for one request
    params: int
    device: str

    @property
    def dtype_name(self) -> str: ...

    @property
    def chat_template(self) -> str | None:
        """Its text, which tells how the model writes tool calls and whether it takes tools."""

    def capabilities(self) -> dict:
        """The welcome's capabilities."""

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        """A conversation ({"role", "content", "images"?: PIL images, "tool_calls"?, "tool_call_id"?})
        through the model's chat template, with OpenAI-shaped function tools when it renders them."""

    def encode_text(self, text: str) -> Prompt:
        """Text to be continued as it is (a plain completion): no chat template."""

    def generate(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int,
                 on_text: Callable[[str, tuple[TokenLogprob, ...]], None],
                 should_stop: Callable[[], str | None]) -> tuple[int, str]:
        """One request alone: text pieces to `on_text` as they come, each with the log probabilities of
        its tokens when settings.logprobs is set (else ()); ends early when `should_stop` gives a reason.
        Returns (tokens generated, finish reason): "stop", "length", or what should_stop gave.

        Every setting of config.GenerationSettings is honoured, here and in a batch: seed (a seeded
        request draws from its own generator, so its text is the same alone and beside others),
        frequency and presence penalties, logprobs, and json_schema (decoding constrained by the grammar
        of the schema: the answer parses and validates whatever the model)."""

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        """(one unit-length vector per input, the inputs' tokens): the model's pooling where its folder
        names one (sentence-transformers' modules), else the mean of the last hidden states. Inputs are
        embedded together where they fit; errors.Refused for an input over max_context. Called beside a
        running batch: the engine takes its turn on the model."""

    def batchable(self, images: int) -> bool:
        """Whether a request (with this many images) may share the batch; one that may not runs alone."""

    def batch_size(self) -> int:
        """How many requests to batch at once on this device and memory (1: one at a time)."""

    def open_batch(self, slots: int) -> Batch:
        """A batch for up to `slots` requests at once, warmed up and ready."""

    def trainer(self, examples: list, settings: TrainingSettings) -> Trainer:
        """LoRA training of the loaded model, as a context manager (the served weights never change);
        errors.Refused for a dataset line the model cannot take."""

    def save(self, folder: Path) -> None:
        """The served model as a model folder."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        ...

    def free_memory(self) -> None:
        """After running out of memory: give back what the failed request held."""

    def lower_max_context(self, failed_at: int) -> None:
        """After running out of memory at `failed_at` tokens, keep well below that."""

    def unload(self) -> None:
        """Let go of the model and free its memory."""


class ReplicaState(Enum):
    """Where an engine replica (engines/replicas/) stands."""
    SERVING = "serving"
    LOST = "lost"  # its process died: Ray restarts it, and its worker waits for that
    DEAD = "dead"  # gone for good: its restarts are used up


class Replica(Engine, Protocol):
    """An engine in another process (a Ray actor), which can be lost and come back."""
    state: ReplicaState
    label: str  # which one, and where: for logs and errors
    on_lost: Callable[[], None]  # called (on any thread) once it is found lost

    def rejoin(self) -> bool:
        """After a loss, wait until it serves again (True) or is gone for good (False)."""

    def status(self) -> dict:
        """Its index, node, process, device, state and restarts: for resources and /metrics."""
