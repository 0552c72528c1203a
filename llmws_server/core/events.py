"""What the core tells about a job, as typed events: the scheduler, the jobs and model control emit
these, and each front end formats them in its own protocol (the WebSocket front end alone knows the seed
protocol's JSON). A request's events go out as Stamped: with its request_id, and a session's seq once
numbered.

    queued -> started -> (text | reasoning | tool call started/arguments)* -> done | failed   a request
    log* -> model_loaded | failed                     a model switch or reload
    train_started -> train_progress* (train_checkpoint*) -> train_done | failed
    snapshot_saved | failed;  log* -> download_done | failed
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from llmws_server.engines.api import TokenLogprob


class FinishReason(str, Enum):
    """Why a stream ended."""
    STOP = "stop"  # the model ended it (or a stop string did)
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # limits.timeout_token_generation
    TOOL_CALLS = "tool_calls"  # the answer called tools


class JobState(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"


class ModelStatus(str, Enum):
    OK = "OK"
    LOADING = "LOADING"  # a switch or reload is unloading and loading


@dataclass(frozen=True)
class Queued:
    position: int  # requests ahead, the running one included


@dataclass(frozen=True)
class Started:
    tokens_in: int
    max_tokens: int
    images_in: int
    sampled: bool


@dataclass(frozen=True)
class Text:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of its tokens, when the request asked for them


@dataclass(frozen=True)
class Reasoning:
    """Text the model wrote inside its thinking markers (<think>...</think>)."""
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    index: int  # 0, 1, ... in the order of the answer
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """A piece of a call's arguments (JSON text): a call's pieces concatenate to its arguments."""
    index: int
    text: str


@dataclass(frozen=True)
class Done:
    tokens: int
    reason: FinishReason
    tokens_per_s: float


@dataclass(frozen=True)
class Failed:
    message: str
    fields: dict = field(default_factory=dict)  # e.g. max_context and input_length


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class ModelLoaded:
    name: str
    status: dict  # the model's status as model control shows it
    reloaded: bool = False  # a recheck found the folder changed and loaded it again (not a switch)


@dataclass(frozen=True)
class TrainStarted:
    settings: dict
    examples: int
    checkpoint_name: str


@dataclass(frozen=True)
class TrainProgress:
    step: int
    max_steps: int
    loss: float
    learning_rate: float
    tokens_per_s: float


@dataclass(frozen=True)
class TrainCheckpoint:
    step: int
    path: str


@dataclass(frozen=True)
class TrainDone:
    steps: int
    checkpoint: str | None
    reason: str  # "done", or "cancelled" (nothing is saved then)
    loss: float | None


@dataclass(frozen=True)
class SnapshotSaved:
    path: str


@dataclass(frozen=True)
class DownloadDone:
    model: dict  # the catalog's entry for the new model


Event = Union[Queued, Started, Text, Reasoning, ToolCallStarted, ToolCallArguments, Done, Failed, Log,
              ModelLoaded, TrainStarted, TrainProgress, TrainCheckpoint,
              TrainDone, SnapshotSaved, DownloadDone]
TERMINAL = (Done, Failed, TrainDone, SnapshotSaved)  # a job's last event


@dataclass(frozen=True)
class Stamped:
    """An event on its way to a client: whose it is and, once a session has numbered it, its seq."""
    event: Event
    request_id: str | None = None
    seq: int | None = None

    @property
    def terminal(self) -> bool:
        return isinstance(self.event, TERMINAL)


def done(tokens: int, reason: FinishReason, elapsed_s: float) -> Done:
    """The end of a stream, with the rate over `elapsed_s`."""
    return Done(tokens, reason, round(tokens / max(elapsed_s, 1e-9), 2))
