"""The one FIFO and the one worker thread that runs its jobs (jobs.Job), one at a time.

The event loop submits jobs; the worker thread runs them against the engine (engines.api.Engine), so the
loop never waits on the model. The batching worker (batching.py) extends this class.
"""
import logging
import threading
import time
from asyncio import AbstractEventLoop

from llmws_server.core.events import JobState, Queued
from llmws_server.core.fairqueue import FairQueue, lane_of
from llmws_server.core.jobs import Job
from llmws_server.engines.api import Engine
from llmws_server.errors import OUT_OF_MEMORY, Busy, Refused
from llmws_server.sessions.store import Session, StreamSession

log = logging.getLogger("llmws.worker")

# Queue positions are told at most this often (the first change after a quiet spell at once), and only to
# jobs whose position changed: a thousand cancels cost one round of `queued`, not a million messages.
POSITION_UPDATE_S = 0.25


class Worker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.queue = FairQueue()
        self.running: Job | None = None
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="llmws-worker", daemon=True)
        self.stopping = False
        self.loop: AbstractEventLoop | None = None  # the event loop, which tells queue positions
        self.update_pending, self.updated_at = False, 0.0

    def start(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running job, drop the queue, and let the thread end."""
        with self.lock:
            self.stopping = True
            self.queue.clear()
            if self.running is not None:
                self.running.cancelled.set()
            self.lock.notify_all()
        self.thread.join(timeout)

    def alive(self) -> bool:
        """The worker runs and takes jobs."""
        return self.thread.is_alive() and not self.stopping

    def submit(self, job: Job) -> None:
        """Queue a job; one that must wait is told how many requests are ahead of it (running one included).
        That is said under the lock, so it reaches the session before the job's `start`."""
        with self.lock:
            self.queue.append(job)
            ahead = job.position = self._position(job)
            if ahead:
                job.emit(Queued(ahead))
                self._positions_changed()  # a newcomer's turn may come before others' later requests
            self.lock.notify_all()  # every idle worker of a replica pool looks

    def waiting(self) -> int:
        with self.lock:
            return len(self.queue)

    def waiting_of(self, session: Session | StreamSession) -> list[Job]:
        with self.lock:
            return self.queue.of_session(session)

    def make_room(self, session: Session | StreamSession, most: int) -> Job | None:
        """A place for a request of `session` in a queue of at most `most` waiting. While there is room,
        None. When it is full, a lane holding fewer than the fullest takes the place of that lane's newest
        job, which leaves the queue and is returned (its client must be told); the fullest lane itself (a
        client over its fair share) is refused with Busy. So no client is refused for another's requests."""
        with self.lock:
            if len(self.queue) < most:
                return None
            taken = self.queue.fullest()
            mine = self.queue.waiting_in(lane_of(session))
            if taken is None or mine >= self.queue.waiting_in(lane_of(taken.session)):
                raise Busy(f"Server queue full ({most} requests waiting, limits.max_queued_requests) and yours hold "
                           "the most places: try again once one of them has started")
            self.queue.remove(taken)
            taken.state = JobState.ENDED
            self._positions_changed()
            return taken

    def remove(self, job: Job) -> bool:
        """Take a job out of the queue if it has not started yet."""
        with self.lock:
            try:
                self.queue.remove(job)
            except ValueError:
                return False
            job.state = JobState.ENDED
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

    def _run(self, job: Job) -> None:
        """Run one job; whatever goes wrong is reported to its client and the worker carries on."""
        job.state = JobState.RUNNING
        try:
            job.run(self)
        except Refused as exc:  # what the job was asked proved impossible (a name taken meanwhile)
            log.info("request %s refused: %s", job.request_id, exc)
            job.fail(f"{job.failure} failed: {exc}")
        except Exception as exc:
            if not self.engine.is_out_of_memory(exc):
                log.exception("request %s failed", job.request_id)
                job.fail(f"{job.failure} failed: {exc}")
                return
            log.warning("out of memory while running request %s", job.request_id)
            self.engine.free_memory()
            if job.context_needed:
                self.engine.lower_max_context(job.context_needed)
            job.fail(OUT_OF_MEMORY)
        finally:
            job.state = JobState.ENDED

    def _position(self, job: Job) -> int:
        index = next(index for index, waiting in enumerate(self.queue) if waiting is job)
        return self._position_at(index, self._starting_now())

    def _position_at(self, index: int, starting: int) -> int:
        """How many requests are ahead of the job at `index` in the queue, a running one included; 0 for the
        `starting` jobs at its head, which start at the worker's next look (lock held)."""
        return 0 if index < starting else max(1, index + self._busy())

    def _starting_now(self) -> int:
        """How many jobs at the head of the queue start at the worker's next look (lock held)."""
        return int(self.running is None)

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
            starting = self._starting_now()
            for index, waiting in enumerate(self.queue):
                position = self._position_at(index, starting)
                if waiting.position != position:
                    waiting.position = position
                    if waiting.position:  # nothing ahead: it starts now, there is nothing to tell
                        waiting.emit(Queued(waiting.position))

    def _busy(self) -> int:
        """1 while no new request can start at once (lock held)."""
        return int(self.running is not None)
