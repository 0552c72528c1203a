"""What the worker runs: one contract (Job) for every kind of job. A job reports back only through
`emit`, which hands each message to the event loop, so the worker thread never touches a socket."""
import logging
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from . import protocol
from .training import TrainStatus

log = logging.getLogger("llmws.jobs")


class Job:
    request_id = None  # a job without one (a model switch asked without one) sends messages without one
    failure = "Generation"  # what "… failed: <reason>" names when it raises

    def __init__(self, session, loop):
        self.session = session
        self.loop = loop
        self.cancelled = threading.Event()
        self.position = None  # the queue position its client was last told
        self.context_needed = None  # tokens in + tokens allowed out, once known: what ran out of memory
        self.created, self.answered = time.monotonic(), False  # queued when; has its first text gone out
        self.observer = None  # called with (job, message) for each message: the server's metrics

    def emit(self, message: dict) -> None:
        """Thread-safe: the session numbers, buffers and sends it on the event loop."""
        if self.request_id is not None:
            message["request_id"] = self.request_id
        if self.observer is not None:
            self.observer(self, message)
        self.loop.call_soon_threadsafe(self.session.emit, message)

    def fail(self, text: str) -> None:
        self.emit(protocol.error(text))

    def batchable(self, engine) -> bool:
        """Whether the job may share the batch with other requests; one that may not runs alone."""
        return False

    def run(self, worker) -> None:
        """Do the work alone on the worker thread; what it raises, the worker reports through `fail`."""
        raise NotImplementedError


class InferenceJob(Job):
    def __init__(self, session, loop, request, timeout_s: float):
        super().__init__(session, loop)
        self.request_id = request.request_id or str(uuid.uuid4())
        self.messages = request.turns
        self.raw_text = request.raw_text
        self.settings = request.settings
        self.timeout_s = timeout_s

    @property
    def images(self) -> int:
        return sum(len(turn.get("images", ())) for turn in self.messages)

    def batchable(self, engine) -> bool:
        return engine.batchable(self.images)

    def prepare(self, engine):
        """Tokenize, refuse a prompt that leaves no room, clamp max_new_tokens to the room left, and say
        `start`. Returns (engine_api.Prompt, max tokens), or None when refused."""
        prompt = engine.encode(self.messages) if self.raw_text is None else engine.encode_text(self.raw_text)
        tokens_in = len(prompt.ids)
        if tokens_in >= engine.max_context:
            self.emit(protocol.context_too_long(tokens_in, engine.max_context))
            return None
        max_tokens = min(self.settings.max_new_tokens, engine.max_context - tokens_in)
        self.context_needed = tokens_in + max_tokens
        self.emit(protocol.start(tokens_in, max_tokens, prompt.images, self.settings.sampled))
        return prompt, max_tokens

    def run(self, worker) -> None:
        engine = worker.engine
        prepared = self.prepare(engine)
        if prepared is None:
            return
        prompt, max_tokens = prepared
        started = time.monotonic()
        deadline = started + self.timeout_s

        def should_stop():
            if self.cancelled.is_set():
                return "cancelled"
            return "timeout" if time.monotonic() > deadline else None

        generated, reason = engine.generate(prompt, self.settings, max_tokens,
                                            lambda text: self.emit(protocol.token(text)), should_stop)
        self.finish(generated, reason, started)

    def finish(self, generated: int, reason: str, started: float) -> None:
        self.emit(protocol.done(generated, reason, time.monotonic() - started))


class SwitchJob(Job):
    """Swap the engine between two requests: unload, free memory, load; on failure, load the old one back."""

    def __init__(self, session, loop, path, load, announce, on_switched, request_id: str | None = None):
        super().__init__(session, loop)
        self.request_id = request_id
        self.path = path
        self.load = load  # path -> Engine
        self.announce = announce  # the new Engine -> the message that says it is loaded
        self.on_switched = on_switched  # (the Engine serving now, why it failed or None), on the event loop

    def log(self, text: str) -> None:
        self.emit(protocol.log(text))

    def run(self, worker) -> None:
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


def save_model_folder(folder: Path, save) -> None:
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

    def __init__(self, session, loop, request, models_dir: Path, shown_dir: str):
        super().__init__(session, loop)
        self.request_id = request.request_id or str(uuid.uuid4())
        self.request, self.models_dir, self.shown_dir = request, models_dir, shown_dir
        self.status = TrainStatus(request_id=self.request_id, max_steps=request.settings.max_steps)

    def fail(self, text: str) -> None:
        self.status.error = text
        super().fail(text)

    def run(self, worker) -> None:
        self.status.running, self.status.started_at = True, time.time()
        try:
            self._train(worker.engine, self.request.settings)
        finally:
            self.status.running = False

    def _train(self, engine, settings) -> None:
        reason, loss, step, tokens = "done", None, 0, 0
        with engine.trainer(self.request.examples, settings) as trainer:
            self.emit(protocol.train_started(asdict(settings), len(self.request.examples), self.request.checkpoint_name))
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
                    self.emit(protocol.train_progress(step, settings.max_steps, loss, settings.learning_rate, rate))
                if self.request.save_checkpoint and settings.save_every and step % settings.save_every == 0 \
                        and step < settings.max_steps:
                    self._save(trainer, f"{self.request.checkpoint_name}-step-{step}", step)
            saved = self._save(trainer, self.request.checkpoint_name, step) \
                if self.request.save_checkpoint and reason == "done" else None
        self.emit(protocol.train_done(step, saved, reason, loss))

    def _save(self, trainer, name: str, step: int) -> str:
        folder = self.models_dir / name
        if folder.exists():
            raise ValueError(f"{self.shown_dir}/{name} exists already: choose another checkpoint_name")
        save_model_folder(folder, trainer.save)
        self.status.checkpoint = shown = f"{self.shown_dir}/{name}"
        self.emit(protocol.train_checkpoint(step, shown))
        return shown


class SnapshotJob(Job):
    """The served model as it is, saved as a new model folder."""
    failure = "Snapshot"

    def __init__(self, session, loop, folder: Path, shown: str, request_id: str | None = None):
        super().__init__(session, loop)
        self.request_id = request_id or str(uuid.uuid4())
        self.folder, self.shown = folder, shown

    def run(self, worker) -> None:
        if self.folder.exists():
            raise ValueError(f"{self.shown} exists already: choose another name")
        save_model_folder(self.folder, worker.engine.save)
        self.emit(protocol.snapshot_saved(self.shown))
