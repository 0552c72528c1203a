"""What the worker runs: one contract (Job) for every kind of job. A job reports back only through
`emit`, which hands each event (core.events) to the event loop, so the worker thread never touches a
session or a socket."""
import logging
import shutil
import threading
import time
import uuid
from asyncio import AbstractEventLoop
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from llmws_server.core import events as ev
from llmws_server.core.events import FinishReason, JobState, Stamped
from llmws_server.core.images import ImageError, decoded
from llmws_server.core.output_parsers import OutputParser
from llmws_server.core.requests import InferenceRequest
from llmws_server.core.tools import parser_for, rendered
from llmws_server.core.training import TrainRequest, TrainSettings, TrainStatus
from llmws_server.errors import ContextTooLong
from llmws_server.sessions.store import Session, StreamSession

if TYPE_CHECKING:
    from llmws_server.core.worker import Worker
    from llmws_server.engines.api import Engine, Prompt, Trainer
from llmws_server.errors import Refused

log = logging.getLogger("llmws.jobs")


class Job:
    request_id: str | None = None  # a job without one (a model switch asked without one) emits without one
    failure = "Generation"  # what "… failed: <reason>" names when it raises
    runs_beside_batch = False  # a short job that takes no slot: run on the worker thread while the batch goes on

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop):
        self.session = session  # a sessions.store.Session or StreamSession: whoever is told its events
        self.loop = loop
        self.state = JobState.QUEUED
        self.cancelled = threading.Event()
        self.position: int | None = None  # the queue position its client was last told
        self.context_needed: int | None = None  # tokens in + tokens allowed out, once known: what ran out of memory
        self.created, self.answered = time.monotonic(), False  # queued when; has its first text gone out
        self.observer: Callable[[Job, ev.Event], None] | None = None  # sees each event: the metrics

    def emit(self, event: ev.Event) -> None:
        """Thread-safe: the session numbers, buffers and delivers it on the event loop."""
        if self.observer is not None:
            self.observer(self, event)
        self.loop.call_soon_threadsafe(self.session.emit, Stamped(event, self.request_id))

    def fail(self, text: str, **fields: object) -> None:
        self.emit(ev.Failed(text, fields))

    def batchable(self, engine: "Engine") -> bool:
        """Whether the job may share the batch with other requests; one that may not runs alone."""
        return False

    def run(self, worker: "Worker") -> None:
        """Do the work alone on the worker thread; what it raises, the worker reports through `fail`."""
        raise NotImplementedError


class InferenceJob(Job):
    """A request: its prompt read, its answer streamed as events. What the model writes goes through the
    request's output parser (core/tools.parser_for), which takes tool calls and thinking apart from text."""

    request_id: str  # the client's, or one made up: a request always has one

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, request: InferenceRequest,
                 timeout_s: float, tool_parser: str = "auto", split_reasoning: bool = True):
        super().__init__(session, loop)
        self.request_id = request.request_id or str(uuid.uuid4())
        self.request = request
        self.messages = request.turns
        self.raw_text = request.raw_text
        self.settings = request.settings
        self.timeout_s = timeout_s
        self.tool_parser = tool_parser  # model.tool_parser: which format a tool call is read in ("auto")
        self.split_reasoning = split_reasoning and request.reasoning  # model.split_reasoning, and the request's
        self.parser: OutputParser | None = None
        self.held_logprobs: tuple = ()  # logprobs of text the parser holds back, for the next text

    @property
    def images(self) -> int:
        return sum(len(turn.get("images", ())) for turn in self.messages)

    def batchable(self, engine: "Engine") -> bool:
        return engine.batchable(self.images)

    def prepare(self, engine: "Engine") -> "tuple[Prompt, int] | None":
        """Tokenize, refuse a prompt that leaves no room, clamp max_new_tokens to the room left, and say
        it started. Returns (engines.api.Prompt, max tokens), or None when refused."""
        if self.raw_text is None:
            try:
                turns, tools = rendered(decoded(self.messages), self.request.tools, engine.chat_template)
            except ImageError as exc:  # its header promised pixels its data does not hold
                self.fail(str(exc))
                return None
            prompt = engine.encode(turns, tools)
            self.parser = parser_for(self.request.tools, self.split_reasoning, engine.chat_template, self.tool_parser)
        else:
            prompt = engine.encode_text(self.raw_text)
        tokens_in = len(prompt.ids)
        if tokens_in >= engine.max_context:
            refusal = ContextTooLong(tokens_in, engine.max_context)
            self.fail(str(refusal), **refusal.fields)
            return None
        max_tokens = min(self.settings.max_new_tokens, engine.max_context - tokens_in)
        self.context_needed = tokens_in + max_tokens
        self.emit(ev.Started(tokens_in, max_tokens, prompt.images, self.settings.sampled))
        return prompt, max_tokens

    def run(self, worker: "Worker") -> None:
        engine = worker.engine
        prepared = self.prepare(engine)
        if prepared is None:
            return
        prompt, max_tokens = prepared
        started = time.monotonic()
        deadline = started + self.timeout_s

        def should_stop() -> FinishReason | None:
            if self.cancelled.is_set():
                return FinishReason.CANCELLED
            return FinishReason.TIMEOUT if time.monotonic() > deadline else None

        generated, reason = engine.generate(prompt, self.settings, max_tokens, self.on_text, should_stop)
        self.finish(generated, FinishReason(reason), started)

    def on_text(self, text: str, logprobs: tuple = ()) -> None:
        """A piece of the answer as the engine decoded it (any thread that runs the model)."""
        if self.parser is None:
            if text or logprobs:
                self.emit(ev.Text(text, logprobs))
            return
        self._emit_parsed(self.parser.feed(text), logprobs)

    def _emit_parsed(self, events: list, logprobs: tuple) -> None:
        logprobs = self.held_logprobs + logprobs
        for event in events:
            if isinstance(event, ev.Text) and logprobs:
                event, logprobs = ev.Text(event.text, logprobs), ()
            self.emit(event)
        self.held_logprobs = logprobs

    def finish(self, generated: int, reason: FinishReason, started: float) -> None:
        if self.parser is not None:
            self._emit_parsed(self.parser.finish(), ())
            if self.parser.calls and reason is FinishReason.STOP:
                reason = FinishReason.TOOL_CALLS
        if self.held_logprobs:
            self.emit(ev.Text("", self.held_logprobs))
            self.held_logprobs = ()
        self.emit(ev.done(generated, reason, time.monotonic() - started))


class SwitchJob(Job):
    """Swap the engine between two requests: unload, free memory, load; on failure, load the old one back."""

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, path: Path,
                 load: "Callable[[Path], Engine]",
                 announce: "Callable[[Engine], ev.ModelLoaded]",
                 on_switched: "Callable[[Engine, str | None], None]", request_id: str | None = None):
        super().__init__(session, loop)
        self.request_id = request_id
        self.path = path
        self.load = load  # path -> Engine
        self.announce = announce  # the new Engine -> the event that says it is loaded
        self.on_switched = on_switched  # (the Engine serving now, why it failed or None), on the event loop

    def log(self, text: str) -> None:
        self.emit(ev.Log(text))

    def run(self, worker: "Worker") -> None:
        old = worker.engine
        self.log(f"Unloading {old.name}...")
        old.unload()
        self.log("Clearing CUDA cache..." if old.device.startswith("cuda") else "Freeing memory...")
        self.log(f"Loading model {self.path.name}...")
        try:
            new = self.load(self.path)
        except Exception as exc:
            log.exception("loading %s failed", self.path)
            self.log(f"Loading {self.path.name} failed; reloading {old.name}...")
            worker.engine = self.load(old.path)
            failure = f"Model switch failed: {exc}. Still serving {old.name}."
            self.fail(failure)
            self.loop.call_soon_threadsafe(self.on_switched, worker.engine, failure)
            return
        worker.engine = new
        self.log(f"✓ Model loaded: {new.name}, {new.params / 1e6:.1f}M parameters, "
                 f"{new.dtype_name} on {new.device}, max context {new.max_context}")
        self.emit(self.announce(new))
        self.loop.call_soon_threadsafe(self.on_switched, new, None)


def save_model_folder(folder: Path, save: Callable[[Path], None]) -> None:
    """`save(partial folder)`, then the rename that makes it a model: a failure leaves no half model."""
    partial = folder.with_name(f".saving-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save(partial)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class TrainJob(Job):
    """LoRA training of the served model, in the FIFO like any request. What it trained is saved merged as
    a new model (models_dir/checkpoint_name); the served model stays as it was."""
    failure = "Training"

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, request: TrainRequest,
                 models_dir: Path, shown_dir: str):
        super().__init__(session, loop)
        self.request_id = request.request_id or str(uuid.uuid4())
        self.request, self.models_dir, self.shown_dir = request, models_dir, shown_dir
        self.status = TrainStatus(request_id=self.request_id, max_steps=request.settings.max_steps)

    def fail(self, text: str, **fields: object) -> None:
        self.status.error = text
        super().fail(text, **fields)

    def run(self, worker: "Worker") -> None:
        self.status.running, self.status.started_at = True, time.time()
        try:
            self._train(worker.engine, self.request.settings)
        finally:
            self.status.running = False

    def _train(self, engine: "Engine", settings: TrainSettings) -> None:
        reason, loss, step, tokens = "done", None, 0, 0
        with engine.trainer(self.request.examples, settings) as trainer:
            self.emit(ev.TrainStarted(asdict(settings), len(self.request.examples), self.request.checkpoint_name))
            started = time.monotonic()
            while step < settings.max_steps:
                if self.cancelled.is_set():
                    reason = "cancelled"
                    break
                loss, used = trainer.step()
                step, tokens = step + 1, tokens + used
                self.status.steps_done, self.status.last_loss = step, loss
                if step % settings.log_every == 0 or step == settings.max_steps:
                    rate = tokens / max(time.monotonic() - started, 1e-9)
                    self.emit(ev.TrainProgress(step, settings.max_steps, round(loss, 5), settings.learning_rate,
                                               round(rate, 1)))
                if self.request.save_checkpoint and settings.save_every and step % settings.save_every == 0 \
                        and step < settings.max_steps:
                    self._save(trainer, f"{self.request.checkpoint_name}-step-{step}", step)
            saved = self._save(trainer, self.request.checkpoint_name, step) \
                if self.request.save_checkpoint and reason == "done" else None
        self.emit(ev.TrainDone(step, saved, reason, loss))

    def _save(self, trainer: "Trainer", name: str, step: int) -> str:
        folder = self.models_dir / name
        if folder.exists():
            raise Refused(f"{self.shown_dir}/{name} exists already: choose another checkpoint_name")
        save_model_folder(folder, trainer.save)
        self.status.checkpoint = shown = f"{self.shown_dir}/{name}"
        self.emit(ev.TrainCheckpoint(step, shown))
        return shown


class SnapshotJob(Job):
    """The served model as it is, saved as a new model folder."""
    failure = "Snapshot"

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, folder: Path, shown: str,
                 request_id: str | None = None):
        super().__init__(session, loop)
        self.request_id = request_id or str(uuid.uuid4())
        self.folder, self.shown = folder, shown

    def run(self, worker: "Worker") -> None:
        if self.folder.exists():
            raise Refused(f"{self.shown} exists already: choose another name")
        save_model_folder(self.folder, worker.engine.save)
        self.emit(ev.SnapshotSaved(self.shown))
