"""The batching worker: the same FIFO, but up to `max_batch_size` requests generate at once, in one
batch the engine runs (engines.api.Batch).

Requests are admitted in arrival order, each as soon as a slot frees, whatever their settings. The engine
says which requests may not share the batch (for transformers: one with images); they and the jobs that
are not requests (a model switch, training, a snapshot) run alone: such a job waits, in order, until the
batch drains, and nothing is admitted past it. A short job (an embedding, a token count) runs beside the
batch, full or not. The batch is opened (and warmed up) when the worker starts and again after a model
switch, and kept open between requests.
"""
import logging
import time
from asyncio import AbstractEventLoop
from dataclasses import dataclass, field

from llmws_server.core.events import FinishReason, JobState
from llmws_server.core.jobs import InferenceJob, Job
from llmws_server.core.worker import Worker
from llmws_server.engines.api import Batch, Engine, Progress

log = logging.getLogger("llmws.batching")


@dataclass
class Member:
    """One request in the batch: its job, its limits, and when it started."""
    job: InferenceJob
    max_tokens: int
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0

    @property
    def deadline(self) -> float:
        return self.started + self.job.timeout_s


class BatchingWorker(Worker):
    def __init__(self, engine: Engine, max_batch_size: int):
        super().__init__(engine)
        self.max_batch_size = max_batch_size
        self.members: dict[str, Member] = {}  # the batch's name for a request -> the request
        self.batch: Batch | None = None  # the engine's Batch, kept open between requests
        self.starting = 0  # jobs taken from the queue and not yet in the batch: their slots are taken

    def start(self, loop: AbstractEventLoop) -> None:
        self._open_batch()  # before the server listens: no first request waits for it
        super().start(loop)

    def _starting_now(self) -> int:
        """How many jobs at the head of the queue start at the worker's next look (lock held)."""
        return self._takes_now()

    def _takes_now(self) -> int:
        """The jobs at the head of the queue this worker starts together: a free slot each, and one that
        must run alone only first and with nothing generating (lock held)."""
        if self.running is not None:
            return 0
        count = slots = 0
        for job in self.queue:
            if not job.runs_beside_batch and len(self.members) + self.starting + slots >= self.max_batch_size:
                break  # a short job beside the batch needs no slot: it starts even when the batch is full
            alone = not job.batchable(self.engine)
            if alone and (self.members or count):
                break  # it waits for the batch to drain
            count, slots = count + 1, slots + (not job.runs_beside_batch)
            if alone:
                break
        return count

    def _busy(self) -> int:
        """1 while the next job cannot start at once: no slot is free, something runs alone, or the next job
        must run alone and the batch has not drained (lock held)."""
        if self.running is not None or len(self.members) + self.starting >= self.max_batch_size:
            return 1
        return int(bool(self.members and self.queue and not self.queue.head().batchable(self.engine)))

    def _loop(self) -> None:
        while self._serving():
            with self.lock:
                while self._idle() and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    break
                admitted = self._admit()
            for job in admitted:
                self._start(job)
                with self.lock:
                    self.starting -= not job.runs_beside_batch
            if self.members:
                self._collect()
        for name, member in list(self.members.items()):
            self._finish(name, FinishReason.CANCELLED)
        self._close_batch()

    def _idle(self) -> bool:
        """Nothing to do: it waits to be woken (lock held)."""
        return not self.queue and not self.members

    def _serving(self) -> bool:
        """Whether the worker goes on taking jobs; a replica's worker waits here for its engine when it
        was lost (core/replicas.py)."""
        return True

    def _admit(self) -> list[Job]:
        """Jobs to start now, from the head of the queue (lock held)."""
        admitted = [self.queue.popleft() for _ in range(self._takes_now())]
        self.starting = sum(not job.runs_beside_batch for job in admitted)
        if admitted:
            self._positions_changed()
        return admitted

    def _start(self, job: Job) -> None:
        if not job.batchable(self.engine):  # with nothing else generating
            engine = self.engine
            self._close_batch()
            self.running = job
            self._run(job)
            self.running = None
            if self.engine is not engine:  # a switch: the new model's batch, warm before its first request
                self._open_batch()
            return
        if job.runs_beside_batch:  # the engine takes its turn on the model between the batch's steps
            self._run(job)
            return
        assert isinstance(job, InferenceJob)  # only requests batch
        job.state = JobState.RUNNING
        try:
            self._add(job)
        except Exception as exc:
            log.exception("request %s could not start", job.request_id)
            job.fail(f"Generation failed: {exc}")

    def _add(self, job: InferenceJob) -> None:
        prepared = job.prepare(self.engine)
        if prepared is None:
            return
        prompt, max_tokens = prepared
        if self.batch is None or self.batch.failure() is not None:
            self._close_batch()
            self.batch = self.engine.open_batch(self.max_batch_size)
        name = self.batch.add(prompt, max_tokens, job.settings)
        self.members[name] = Member(job, max_tokens)

    def _open_batch(self) -> None:
        """Open the batch ahead of the requests, if the engine batches at all (errors wait for a request)."""
        if self.batch is None and self.engine.batchable(0):
            try:
                started = time.monotonic()
                self.batch = self.engine.open_batch(self.max_batch_size)
                log.info("batch of up to %d requests ready in %.1f s", self.max_batch_size, time.monotonic() - started)
            except Exception:
                log.exception("could not open the batch")

    def _close_batch(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None

    def _collect(self) -> None:
        """Hand on what the batch produced in the last moment; end cancelled and overdue requests."""
        assert self.batch is not None  # there are members: the batch they are in is open
        for progress in self.batch.progress(timeout=0.02):
            member = self.members.get(progress.request)
            if member is not None:
                self._hand_on(progress, member)
        now = time.monotonic()
        for name, member in list(self.members.items()):
            reason = (FinishReason.CANCELLED if member.job.cancelled.is_set()
                      else FinishReason.TIMEOUT if now > member.deadline else None)
            if reason:
                self.batch.cancel(name)
                self._finish(name, reason)
        failure = self.members and self.batch.failure()
        if failure:
            log.error("the batch stopped: %s", failure)
            for name, member in list(self.members.items()):
                self._leave(name)
                member.job.fail(failure)
            self.batch = None

    def _hand_on(self, progress: Progress, member: Member) -> None:
        member.tokens = progress.tokens
        if progress.error:
            self._leave(progress.request)
            member.job.fail(progress.error)
            return
        if progress.text or progress.logprobs:
            member.job.on_text(progress.text, progress.logprobs)
        if progress.finished:
            ended = FinishReason.LENGTH if progress.tokens >= member.max_tokens else FinishReason.STOP
            self._finish(progress.request, ended)

    def _finish(self, name: str, reason: FinishReason) -> None:
        member = self._leave(name)
        member.job.finish(member.tokens, reason, member.started)

    def _leave(self, name: str) -> Member:
        member = self.members.pop(name)
        member.job.state = JobState.ENDED
        with self.lock:
            self._positions_changed()
        return member
