"""The batching worker: the same FIFO, but up to `max_batch_size` requests generate at once, in one
batch the engine runs (engine_api.Batch).

Requests are admitted in arrival order, each as soon as a slot frees. The engine says which requests may
share a batch (their `batch_kind`: for transformers, greedy apart from sampled) and which must run alone
(None: a repetition penalty, images, a model switch). A request that cannot join the running batch waits,
in order, until the batch drains; nothing is admitted past a request that waits.
"""
import logging
import time
from dataclasses import dataclass, field

from . import protocol
from .worker import Worker

log = logging.getLogger("llmws.batching")


@dataclass
class Member:
    """One request in the batch: its job, its limits, and when it started."""
    job: object
    max_tokens: int
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0

    @property
    def deadline(self) -> float:
        return self.started + self.job.timeout_s


class BatchingWorker(Worker):
    def __init__(self, engine, max_batch_size: int):
        super().__init__(engine)
        self.max_batch_size = max_batch_size
        self.members: dict[str, Member] = {}  # the batch's name for a request -> the request
        self.batch = None  # the engine's Batch, kept open between requests of the same kind
        self.batch_kind = None

    def _busy(self) -> int:
        """1 while the next job cannot start at once: no slot is free, something runs alone, or the batch
        runs another kind than the next job's (lock held)."""
        if self.running is not None or len(self.members) >= self.max_batch_size:
            return 1
        return int(bool(self.members and self.queue and not self._joins(self.queue.head())))

    def _joins(self, job) -> bool:
        kind = job.batch_kind(self.engine)
        return kind is not None and kind == self.batch_kind

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.members and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    break
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            if self.members:
                self._collect()
        for name, member in list(self.members.items()):
            self._finish(name, "cancelled")
        self._close_batch()

    def _admit(self) -> list:
        """Jobs to start now, from the head of the queue (lock held)."""
        admitted, kind = [], self.batch_kind if self.members else None
        while self.queue and len(self.members) + len(admitted) < self.max_batch_size:
            job_kind = self.queue.head().batch_kind(self.engine)
            if (self.members or admitted) and (job_kind is None or job_kind != kind):
                break  # it must run alone, or in another kind of batch: wait for this one to drain
            admitted.append(self.queue.popleft())
            if job_kind is None:
                break
            kind = job_kind
        if admitted:
            self._positions_changed()
        return admitted

    def _start(self, job) -> None:
        kind = job.batch_kind(self.engine)
        if kind is None:  # with nothing else generating
            self._close_batch()
            self.running = job
            self._run(job)
            self.running = None
            return
        try:
            self._add(job, kind)
        except Exception as exc:
            log.exception("request %s could not start", job.request_id)
            job.fail(f"Generation failed: {exc}")

    def _add(self, job, kind: str) -> None:
        prepared = job.prepare(self.engine)
        if prepared is None:
            return
        prompt, max_tokens = prepared
        if self.batch is None or self.batch_kind != kind or self.batch.failure() is not None:
            self._close_batch()
            self.batch = self.engine.open_batch(kind, self.max_batch_size, job.settings.max_new_tokens)
            self.batch_kind = kind
        name = self.batch.add(prompt, max_tokens, job.settings)
        self.members[name] = Member(job, max_tokens)

    def _close_batch(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = self.batch_kind = None

    def _collect(self) -> None:
        """Hand on what the batch produced in the last moment; end cancelled and overdue requests."""
        for progress in self.batch.progress(timeout=0.02):
            member = self.members.get(progress.request)
            if member is not None:
                self._hand_on(progress, member)
        now = time.monotonic()
        for name, member in list(self.members.items()):
            reason = "cancelled" if member.job.cancelled.is_set() else "timeout" if now > member.deadline else None
            if reason:
                self.batch.cancel(name)
                self._finish(name, reason)
        failure = self.members and self.batch.failure()
        if failure:
            log.error("the batch stopped: %s", failure)
            for name, member in list(self.members.items()):
                self._leave(name)
                member.job.fail(failure)
            self.batch = self.batch_kind = None

    def _hand_on(self, progress, member: Member) -> None:
        member.tokens = progress.tokens
        if progress.error:
            self._leave(progress.request)
            member.job.fail(progress.error)
            return
        if progress.text:
            member.job.emit(protocol.token(progress.text))
        if progress.finished:
            self._finish(progress.request, "length" if progress.tokens >= member.max_tokens else "stop")

    def _finish(self, name: str, reason: str) -> None:
        member = self._leave(name)
        member.job.finish(member.tokens, reason, member.started)

    def _leave(self, name: str) -> Member:
        member = self.members.pop(name)
        with self.lock:
            self._positions_changed()
        return member
