"""What the worker runs: one contract (Job) for every kind of job. A job reports back only through
`emit`, which hands each message to the event loop, so the worker thread never touches a socket."""
import logging
import threading
import time
import uuid

from . import protocol

log = logging.getLogger("llmws.jobs")


class Job:
    request_id = None  # a job without one (a model switch) sends messages without one

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

    def batch_kind(self, engine) -> str | None:
        """Jobs of the same kind may run together in a batch; None: this one runs alone."""
        return None

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

    def batch_kind(self, engine) -> str | None:
        return engine.batch_kind(self.settings, self.images)

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

    def __init__(self, session, loop, path, load, announce, on_switched):
        super().__init__(session, loop)
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
