"""An engine replica seen from the server: RemoteEngine is an engines.api.Engine whose calls go to a
Ray actor (replica.py), and RemoteBatch its Batch. Tokens come back on Ray streaming generators, read
by a thread into a queue, so the scheduler's `progress(timeout)` works as with an engine in process.

When the actor's process dies, the stream says so: the engine is marked lost with the cause, and the
batch's failure names it, so its requests end with that error. Ray restarts the actor (within
max_restarts); `rejoin` waits for it.
"""
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from llmws_server.config import GenerationSettings
from llmws_server.engines.api import Progress, Prompt, ReplicaState, TokenLogprob, queued_progress
from llmws_server.engines.replicas.replica import BatchFailed, Described

log = logging.getLogger("llmws.replicas")
CALL_TIMEOUT_S = 120  # a call the actor does not answer in this long counts as the replica lost
REJOIN_POLL_S = 0.5  # how often a lost replica is asked whether Ray has restarted it
LOST = (RayActorError, ActorUnavailableError, GetTimeoutError)  # the process or its node is gone, or hangs


def got(ref: Any) -> Any:
    """ray.get, raising what the engine raised as it raised it (errors.Refused reaches the client as such)."""
    try:
        return ray.get(ref, timeout=CALL_TIMEOUT_S)
    except RayTaskError as exc:
        raise exc.cause from None


class RemoteEngine:
    def __init__(self, index: int, actor: Any, described: Described | None):
        """`described` is None for a replica that could not load (it is kept, dead, for resources)."""
        self.index, self.actor = index, actor
        self.state, self.cause = ReplicaState.SERVING, ""
        self.restarts = 0
        self.on_lost: Callable[[], None] = lambda: None
        self.described = described
        if described is not None:
            self._take(described)

    def _take(self, described: Described) -> None:
        self.described = described
        self.name, self.path, self.vision = described.name, described.path, described.vision
        self.max_context, self.params, self.device = described.max_context, described.params, described.device
        self.dtype_name, self.chat_template = described.dtype_name, described.chat_template

    @property
    def label(self) -> str:
        where = self.described
        return f"replica {self.index}" + (f" (node {where.node[:8]}, pid {where.pid})" if where else "")

    def lost(self, exc: BaseException) -> str:
        """Mark the replica lost (its calls failed with `exc`); returns the message for its requests."""
        if self.state is ReplicaState.SERVING:
            self.state, self.cause = ReplicaState.LOST, f"{type(exc).__name__}: {exc}".split("\n")[0]
            log.warning("%s was lost: %s", self.label, self.cause)
            self.on_lost()
        return f"The engine {self.label} was lost: {self.cause}"

    def rejoin(self) -> bool:
        """Wait for Ray to restart the lost actor; True once it serves again, False when it is gone (its
        restarts used up, or not back within CALL_TIMEOUT_S)."""
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            try:
                self._take(ray.get(self.actor.describe.remote(), timeout=CALL_TIMEOUT_S))
                break
            except ActorUnavailableError as exc:  # restarting: Ray refuses calls until it is back
                if time.monotonic() < deadline:
                    time.sleep(REJOIN_POLL_S)
                    continue
                return self._gone(exc)
            except Exception as exc:
                return self._gone(exc)
        self.state, self.restarts, self.cause = ReplicaState.SERVING, self.restarts + 1, ""
        log.info("%s is back (restart %d)", self.label, self.restarts)
        return True

    def _gone(self, exc: BaseException) -> bool:
        self.state, self.cause = ReplicaState.DEAD, f"{type(exc).__name__}: {exc}".split("\n")[0]
        log.error("replica %d is gone: %s", self.index, self.cause)
        return False

    def status(self) -> dict:
        where = self.described
        return {"index": self.index, "node": where and where.node, "pid": where and where.pid,
                "device": where and where.device, "state": self.state.value, "restarts": self.restarts,
                **({"cause": self.cause} if self.cause else {})}

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return got(getattr(self.actor, method).remote(*args))
        except LOST as exc:
            raise RuntimeError(self.lost(exc)) from None

    # -- engines.api.Engine ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> Described:
        """What the replica serves (only one that loaded is asked)."""
        assert self.described is not None
        return self.described

    def capabilities(self) -> dict:
        return self.loaded.capabilities

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        return self._call("encode", messages, tools)

    def encode_text(self, text: str) -> Prompt:
        return self._call("encode_text", text)

    def embed(self, inputs: list) -> tuple[list[list[float]], int]:
        return self._call("embed", inputs)

    def batchable(self, images: int) -> bool:
        return self.loaded.batches_images if images else self.loaded.batches

    def batch_size(self) -> int:
        return self.loaded.batch_size

    def open_batch(self, slots: int) -> "RemoteBatch":
        self._call("open_batch", slots)
        return RemoteBatch(self)

    def generate(self, prompt: Prompt, settings: GenerationSettings, max_new_tokens: int,
                 on_text: Callable[[str, tuple[TokenLogprob, ...]], None],
                 should_stop: Callable[[], str | None]) -> tuple[int, str]:
        stopping = False
        try:
            for ref in self.actor.generate.options(num_returns="streaming").remote(prompt, settings, max_new_tokens):
                piece = got(ref)
                if piece[0] == "end":
                    return piece[1], piece[2]
                on_text(piece[1], piece[2])
                reason = should_stop()
                if reason and not stopping:
                    stopping = True
                    self.actor.stop_solo.remote(str(reason))
        except LOST as exc:
            raise RuntimeError(self.lost(exc)) from None
        raise RuntimeError("the replica's stream ended without its end")

    def trainer(self, examples: list, settings: Any) -> Any:
        raise NotImplementedError("refused before it is queued (core/model_control.py)")

    def save(self, folder: Path) -> None:
        raise NotImplementedError("refused before it is queued (core/model_control.py)")

    def is_out_of_memory(self, exc: BaseException) -> bool:
        cause = getattr(exc, "cause", exc)  # a RayTaskError holds what the actor raised
        return isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError"

    def free_memory(self) -> None:
        self._call("free_memory")

    def lower_max_context(self, failed_at: int) -> None:
        self.max_context = self._call("lower_max_context", failed_at)

    def unload(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RemoteBatch:
    """engines.api.Batch over a replica's stream (replica.Replica.stream)."""

    def __init__(self, engine: RemoteEngine):
        self.engine = engine
        self.results: queue.Queue[Progress] = queue.Queue()
        self.cancelled: set[str] = set()
        self.failed: str | None = None
        stream = engine.actor.stream.options(num_returns="streaming").remote()
        self.reader = threading.Thread(target=self._read, args=(stream,), name="llmws-replica-stream", daemon=True)
        self.reader.start()

    def _read(self, stream: Iterable[Any]) -> None:
        try:
            for ref in stream:
                item = got(ref)
                if isinstance(item, BatchFailed):
                    self.failed = item.text
                    return
                for progress in item:
                    self.results.put(progress)
        except LOST as exc:  # the actor's process died, or its node was lost
            self.failed = self.engine.lost(exc)
        except Exception as exc:  # the engine's batch raised
            self.failed = f"Generation failed: {exc}"

    def add(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> str:
        try:
            return self.engine._call("add", prompt, max_tokens, settings)
        except RuntimeError:
            if self.engine.state is ReplicaState.LOST:
                self.failed = self.engine.lost(RuntimeError())
            raise

    def cancel(self, request: str) -> None:
        self.cancelled.add(request)
        self.engine.actor.cancel.remote(request)

    def progress(self, timeout: float) -> list[Progress]:
        return queued_progress(self.results, timeout, self.cancelled)

    def failure(self) -> str | None:
        return self.failed if self.results.empty() else None  # what came before the failure is handed on first

    def close(self) -> None:
        if self.failed is None:
            try:
                self.engine._call("close_batch")
            except Exception as exc:
                self.engine.lost(exc)
        self.reader.join(5)
