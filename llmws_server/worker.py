"""The one FIFO and the one worker thread that runs its jobs, one at a time.

The event loop submits jobs; the worker thread runs them against the engine. A job reports back only
through `job.emit`, which hands each message to the event loop, so the loop never waits on torch and
the worker never touches a socket. A batching worker can replace this class: it needs `submit`,
`remove`, `start` and `stop`, and the same job interface.
"""
import logging
import threading
import time
import uuid

import torch

from .engine import free_memory
from .fairqueue import FairQueue

log = logging.getLogger("llmws.worker")

OOM_MESSAGE = "CUDA out of memory. Context too long. Please retry with shorter input."
# Queue positions are told at most this often (the first change after a quiet spell at once), and only to
# jobs whose position changed: a thousand cancels cost one round of `queued`, not a million messages.
POSITION_UPDATE_S = 0.25


class InferenceJob:
    def __init__(self, session, loop, request_id, messages, settings, timeout_s):
        self.session = session
        self.loop = loop
        self.request_id = request_id or str(uuid.uuid4())
        self.messages = messages
        self.settings = settings
        self.timeout_s = timeout_s
        self.cancelled = threading.Event()
        self.context_needed = None  # tokens in + tokens allowed out, once known
        self.position = None  # the queue position its client was last told

    def emit(self, message: dict) -> None:
        """Thread-safe: the session numbers, buffers and sends it on the event loop."""
        message["request_id"] = self.request_id
        self.loop.call_soon_threadsafe(self.session.emit, message)

    @property
    def images(self) -> int:
        return sum(len(turn.get("images", ())) for turn in self.messages)

    def prepare(self, engine):
        """Tokenize, refuse a prompt that leaves no room (the seed's error), clamp max_new_tokens to the
        room left, and say `start`. Returns (engine.Prompt, max tokens), or None when refused."""
        prompt = engine.encode(self.messages)
        tokens_in = len(prompt.ids)
        if tokens_in >= engine.max_context:
            self.emit({"type": "error", "message": f"Context too long ({tokens_in} tokens). "
                       f"Max: {engine.max_context}. Please retry with shorter input.",
                       "max_context": engine.max_context, "input_length": tokens_in})
            return None
        max_tokens = min(self.settings["max_new_tokens"], engine.max_context - tokens_in)
        self.context_needed = tokens_in + max_tokens
        self.emit({"type": "start", "tokens_in": tokens_in, "max_tokens": max_tokens, "images_in": prompt.images})
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
                                            lambda text: self.emit({"type": "token", "data": text}), should_stop)
        self.finish(generated, reason, started)

    def finish(self, generated: int, reason: str, started: float) -> None:
        """The stream's last message: tokens generated, why it ended, and the rate since `started`."""
        elapsed = max(time.monotonic() - started, 1e-9)
        self.emit({"type": "done", "total_tokens": generated, "finish_reason": reason,
                   "tokens_per_s": round(generated / elapsed, 2)})

    def fail(self, message: str) -> None:
        self.emit({"type": "error", "message": message})


class SwitchJob:
    """Swap the engine between two requests: unload, free memory, load; on failure, load the old one back."""

    request_id = None
    position = None

    def __init__(self, session, loop, path, load, on_switched):
        self.session = session
        self.loop = loop
        self.path = path
        self.load = load  # path -> Engine
        self.on_switched = on_switched  # called on the event loop with the new engine

    def emit(self, message: dict) -> None:
        self.loop.call_soon_threadsafe(self.session.emit, message)

    def log(self, text: str) -> None:
        self.emit({"type": "log", "message": text})

    def fail(self, message: str) -> None:
        self.emit({"type": "error", "message": message})

    def run(self, worker) -> None:
        old = worker.engine
        self.log(f"Unloading {old.name}...")
        old.unload()
        self.log("Clearing CUDA cache..." if torch.cuda.is_available() else "Freeing memory...")
        self.log(f"Loading model {self.path.name}...")
        try:
            new = self.load(self.path)
        except Exception as exc:
            log.exception("loading %s failed", self.path)
            self.log(f"Loading {self.path.name} failed; reloading {old.name}...")
            worker.engine = self.load(old.path)
            self.fail(f"Model switch failed: {exc}. Still serving {old.name}.")
            return
        worker.engine = new
        self.log(f"✓ Model loaded: {new.name}, {new.params / 1e6:.1f}M parameters, "
                 f"{new.dtype_name} on {new.device}, max context {new.max_context}")
        self.emit({"type": "model_switched", "message": f"Model switched to {new.name}", "model": new.name})
        self.loop.call_soon_threadsafe(self.on_switched, new)


class Worker:
    def __init__(self, engine):
        self.engine = engine
        self.queue = FairQueue()
        self.running = None
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="llmws-worker", daemon=True)
        self.stopping = False
        self.loop = None  # the event loop, which tells queue positions
        self.update_pending, self.updated_at = False, 0.0

    def start(self, loop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running job, drop the queue, and let the thread end."""
        with self.lock:
            self.stopping = True
            self.queue.clear()
            if isinstance(self.running, InferenceJob):
                self.running.cancelled.set()
            self.lock.notify_all()
        self.thread.join(timeout)

    def submit(self, job) -> None:
        """Queue a job; one that must wait is told how many requests are ahead of it (running one included).
        That is said under the lock, so it reaches the session before the job's `start`."""
        with self.lock:
            self.queue.append(job)
            ahead = job.position = self._position(job)
            if ahead:
                job.emit({"type": "queued", "position": ahead})
                self._positions_changed()  # a newcomer's turn may come before others' later requests
            self.lock.notify()

    def waiting(self) -> int:
        with self.lock:
            return len(self.queue)

    def waiting_of(self, session) -> list:
        with self.lock:
            return self.queue.of_session(session)

    def remove(self, job) -> bool:
        """Take a job out of the queue if it has not started yet."""
        with self.lock:
            try:
                self.queue.remove(job)
            except ValueError:
                return False
            self._positions_changed()
            return True

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                job = self.running = self.queue.popleft()
                self._positions_changed()
            self._run(job)
            with self.lock:
                self.running = None

    def _run(self, job) -> None:
        """Run one job; whatever goes wrong is reported to its client and the worker carries on."""
        try:
            job.run(self)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            log.warning("out of memory while running request %s", job.request_id)
            free_memory()
            if getattr(job, "context_needed", None) and self.engine.model is not None:
                self.engine.lower_max_context(job.context_needed)
            job.fail(OOM_MESSAGE)
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            job.fail(f"Generation failed: {exc}")

    def _position(self, job) -> int:
        """How many requests are ahead of a waiting job, a running one included (lock held)."""
        return next(index for index, waiting in enumerate(self.queue) if waiting is job) + self._busy()

    def _positions_changed(self) -> None:
        """Have the event loop tell the waiting jobs their new positions, coalesced (lock held)."""
        if self.update_pending or self.loop is None:
            return
        self.update_pending = True
        delay = max(0.0, self.updated_at + POSITION_UPDATE_S - time.monotonic())
        self.loop.call_soon_threadsafe(self.loop.call_later, delay, self._announce_positions)

    def _announce_positions(self) -> None:
        """On the event loop. Under the lock, so no job told its place can have started meanwhile."""
        with self.lock:
            self.update_pending, self.updated_at = False, time.monotonic()
            busy = self._busy()
            for index, waiting in enumerate(self.queue):
                if waiting.position != index + busy:
                    waiting.position = index + busy
                    if waiting.position:  # nothing ahead: it starts now, there is nothing to tell
                        waiting.emit({"type": "queued", "position": waiting.position})

    def _busy(self) -> int:
        """1 while no new request can start at once (lock held)."""
        return int(self.running is not None)
