"""The core: one Service owns the engine (through the worker), the scheduler, the sessions, the metrics
and model control, and is the only door the front ends use. It knows no socket and no HTTP: requests
come in typed (core.requests), events go out typed (core.events) to the session that asked, and
refusals are errors.Refused or errors.Busy.
"""
import asyncio
import logging
import time
from typing import Any, cast

from llmws_server.config import Config, generation_defaults
from llmws_server.core.batching import BatchingWorker
from llmws_server.core.events import Failed, JobState, Stamped
from llmws_server.core.images import check_images
from llmws_server.core.jobs import InferenceJob, Job
from llmws_server.core.metrics import Metrics
from llmws_server.core.model_control import ModelControl
from llmws_server.core.replicas import ReplicaPool
from llmws_server.core.reply_jobs import CountJob, Embedded, EmbedJob, ReplyJob, checked_inputs
from llmws_server.core.requests import InferenceRequest, images_of
from llmws_server.core.worker import Worker
from llmws_server.engines.api import Engine, Replica
from llmws_server.errors import Busy, ContextTooLong, Refused
from llmws_server.sessions.store import Codec, Session, SessionStore, StreamSession

log = logging.getLogger("llmws.server")
SESSION_IDLE_S = 24 * 3600  # a session nobody takes up for a day is forgotten, buffer and all
HOUSEKEEPING_S = 10  # how often idle sessions and the queued requests of long-gone clients are looked at
PROMPT_CHARS_PER_TOKEN = 8  # a prompt longer than this many characters per context token is refused unread


class Service:
    def __init__(self, config: Config, engines: list[Engine], codec: Codec):
        """`engines`: the one engine in process, or the replicas (engines.api.Replica) with
        replicas.ray_address set (engines.registry.load_engines)."""
        self.config = config
        self.limits = config.limits
        engine = engines[0]  # with replicas, one that loaded
        # For the model loaded now; the sessions and the front ends read it, a switch updates it in place
        self.generation_defaults = generation_defaults(config, engine.path)
        self.sessions = SessionStore(config.paths["sessions_dir"], self.generation_defaults, codec,
                                     self.limits["max_sessions"])
        batch = config.optimization["max_batch_size"]
        if batch == "auto":
            batch = engine.batch_size()
            log.info("batching up to %d requests at once (optimization.max_batch_size \"auto\" on %s)",
                     batch, engine.device)
        self.worker = self._worker(engines, batch)
        self.metrics = Metrics(self.worker.waiting, lambda: len(self.sessions.sessions))
        if isinstance(self.worker, ReplicaPool):
            self.metrics.watch_replicas(self.worker.status)
        self.models = ModelControl(config, self.worker, self.sessions, self.metrics, self.generation_defaults)

    def _worker(self, engines: list[Engine], batch: int) -> Worker:
        if self.config.replicas["ray_address"] is not None:
            return ReplicaPool(cast(list[Replica], engines), batch)
        return BatchingWorker(engines[0], batch) if batch > 1 else Worker(engines[0])

    @property
    def engine(self) -> Engine:
        return self.worker.engine

    @property
    def max_batch_size(self) -> int:
        """How many requests decode together: what n (choices of one answer) may be at most."""
        return getattr(self.worker, "max_batch_size", 1)

    async def start(self) -> None:
        """Once this server owns its ports: earlier sessions (unless server.keep_sessions_over_restart) and
        half-done downloads end here, then the worker starts (the batching worker sets its batch up first)."""
        if self.config.server["keep_sessions_over_restart"]:
            log.info("took up %d sessions kept over the restart", self.sessions.restore(SESSION_IDLE_S))
        else:
            self.sessions.clear_all()
        for name in self.models.downloads.clear_leftovers():
            log.info("removed %s, left by a download that was cut off", name)
        await asyncio.to_thread(self.worker.start, asyncio.get_running_loop())

    def stop(self) -> None:
        self.sessions.close()
        self.worker.stop()

    async def housekeeping(self) -> None:
        """Runs for the server's life: cancel what long-gone clients left queued, forget idle sessions."""
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_S, self.limits["detached_queue_timeout_s"] / 2))
            self.cancel_abandoned(time.monotonic())
            gone = self.sessions.expire(SESSION_IDLE_S)
            if gone:
                log.info("forgot %d idle sessions", gone)

    def cancel_abandoned(self, now: float) -> None:
        """Queued requests of a session whose client left more than detached_queue_timeout_s ago are cancelled
        (what runs goes on); the error is buffered, so the client learns of it if it comes back."""
        gone_for = self.limits["detached_queue_timeout_s"]
        for session in list(self.sessions.sessions.values()):
            if session.connection is not None or session.detached_at is None or now - session.detached_at < gone_for:
                continue
            cancelled = [job for job in self.worker.waiting_of(session) if self.worker.remove(job)]
            for job in cancelled:
                session.emit(Stamped(Failed(f"Cancelled: its client was gone for more than {gone_for} s"),
                                     job.request_id))
            if cancelled:
                log.info("session %s: cancelled %d queued requests, its client gone for %d s",
                         session.label, len(cancelled), now - session.detached_at)

    async def submit(self, session: Session | StreamSession, request: InferenceRequest) -> InferenceJob:
        """Queue a request for a session (a WebSocket session, or an HTTP request's); errors.Refused refuses
        it, errors.Busy when the server or the session has no room now."""
        turns = request.turns
        characters = sum(len(turn["content"]) for turn in turns)
        max_context = self.engine.max_context
        if characters > PROMPT_CHARS_PER_TOKEN * max_context:  # refused untokenized: a lower bound will do
            raise ContextTooLong(characters // PROMPT_CHARS_PER_TOKEN, max_context, estimated=True,
                                 characters=characters)
        self._make_room(session)
        most = self.limits["max_session_buffer_mb"] * 1024 ** 2
        if session.buffer_bytes > most:
            raise Busy(f"Session buffer full ({session.buffer_bytes // 1024 ** 2} MB not acknowledged): "
                       "send ack once you have your answers, then retry")
        job = InferenceJob(session, asyncio.get_running_loop(), request, self.limits["timeout_token_generation"],
                           self.config.model["tool_parser"], self.config.model["split_reasoning"])
        job.observer = self.metrics.observe
        session.add_job(job, self.limits["queue_size_per_client"])
        if images_of(turns):
            try:
                await self._check_images(turns)
            except BaseException:
                session.drop_job(job.request_id)
                raise
        self.worker.submit(job)
        return job

    def _make_room(self, session: Session | StreamSession) -> None:
        """A place in the server queue (max_queued_requests) for the session's request, or Busy: when it is
        full, the client holding the most waiting requests gives its newest one up (worker.make_room) and is
        told so; a detached session's requests count as its own."""
        most = self.limits["max_queued_requests"]
        taken = self.worker.make_room(session, most)
        if taken is None:
            return
        text = (f"Cancelled to make room: the server queue is full ({most} requests waiting, "
                "limits.max_queued_requests) and this client held the most of them; send it again later")
        log.info("request %s gave its place in the full queue to another client's", taken.request_id)
        if isinstance(taken, ReplyJob):
            taken.settle(exception=Busy(text))
        else:
            taken.fail(text, max_queued_requests=most)

    async def _check_images(self, turns: list[dict]) -> None:
        """Replace each turn's images as sent with checked ones (their headers read off the event loop; the
        pixels are decoded when the request starts), or refuse them all."""
        if not self.engine.vision:
            raise Refused(f"This model does not take images: {self.engine.name}", "images")
        checked = iter(await asyncio.to_thread(check_images, images_of(turns), self.limits))
        for turn in turns:
            if "images" in turn:
                turn["images"] = [next(checked) for _ in turn["images"]]

    async def embed(self, inputs: object, session: Session | StreamSession | None = None,
                    field: str = "input") -> Embedded:
        """The inputs' vectors (core.reply_jobs), queued in the session's lane (without one, a lane of its
        own); errors.Refused for inputs over the limits."""
        checked = checked_inputs(inputs, self.limits["max_embedding_inputs"], field)
        return await self._reply(EmbedJob(session or StreamSession(), asyncio.get_running_loop(), checked))

    async def count_tokens(self, request: InferenceRequest, session: Session | StreamSession | None = None) -> int:
        """The request's prompt tokens, as the model would read it."""
        if images_of(request.turns):
            await self._check_images(request.turns)
        return await self._reply(CountJob(session or StreamSession(), asyncio.get_running_loop(), request))

    async def _reply(self, job: ReplyJob) -> Any:
        self._make_room(job.session)
        self.worker.submit(job)
        try:
            return await job.result
        finally:
            if not job.result.done():  # the client left: it need not run
                self.worker.remove(job)
                job.cancelled.set()

    def cancel(self, session: Session | StreamSession, job: Job) -> None:
        """A queued job (a request, training, a snapshot) leaves the queue; a running one ends at its next
        step, told as cancelled."""
        if self.worker.remove(job):
            if job.request_id is not None:  # a job a session holds has one
                session.drop_job(job.request_id)
        elif job.state is not JobState.ENDED:
            job.cancelled.set()
