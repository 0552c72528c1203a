"""Several engine replicas (engines.api.Replica: Ray actors, engines/replicas/) behind the one fair queue.

Each replica has its own batching worker (core/batching.py), and all of them take jobs from the pool's
one queue under its one lock: round-robin between clients, first come first served within each, and
queue positions hold across the replicas. The least loaded replica takes the next job, one at a time,
so clients spread over the replicas.

A replica whose process dies fails what it was running with the cause (its batch's failure), and its
worker waits for Ray to restart it, taking nothing meanwhile: what is queued goes to the others. When
every replica is gone for good, what is queued and what comes later fails with the cause.
"""
import logging
from asyncio import AbstractEventLoop

from llmws_server.core.batching import BatchingWorker
from llmws_server.core.events import JobState
from llmws_server.core.jobs import InferenceJob, Job
from llmws_server.core.worker import Worker
from llmws_server.engines.api import Replica, ReplicaState

log = logging.getLogger("llmws.replicas")


class ReplicaWorker(BatchingWorker):
    def __init__(self, engine: Replica, max_batch_size: int, pool: "ReplicaPool"):
        super().__init__(engine, max_batch_size)
        self.replica, self.pool = engine, pool
        self.queue, self.lock = pool.queue, pool.lock
        self.served = 0  # requests it has started
        engine.on_lost = self._wake  # an idle replica's worker wakes to wait for it to come back
        self.thread.name = f"llmws-{engine.label.split(' (')[0].replace(' ', '-')}"

    @property
    def serving(self) -> bool:
        return self.replica.state is ReplicaState.SERVING and self.thread.is_alive()

    def load(self) -> int:
        """Requests it holds or is starting (lock held)."""
        return len(self.members) + self.starting + int(self.running is not None)

    def free_slots(self) -> int:
        return 0 if self.running is not None else max(0, self.max_batch_size - self.load())

    def _wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def _idle(self) -> bool:
        return super()._idle() and self.replica.state is ReplicaState.SERVING

    def _takes_now(self) -> int:
        """One job at a time, and only while no serving replica holds fewer (lock held)."""
        if self.replica.state is not ReplicaState.SERVING:
            return 0
        if any(peer.load() < self.load() for peer in self.pool.serving() if peer is not self):
            return 0
        return min(1, super()._takes_now())

    def start(self, loop: AbstractEventLoop) -> None:
        if self.replica.state is ReplicaState.SERVING:  # one that could not load never starts
            super().start(loop)

    def stop(self, timeout: float = 5.0) -> None:
        if self.thread.ident is not None:  # one that could not load never started its thread: no join
            super().stop(timeout)

    def _positions_changed(self) -> None:
        self.pool._positions_changed()

    def _start(self, job: Job) -> None:
        if isinstance(job, InferenceJob):  # in the batch or alone (one with images)
            self.served += 1
        super()._start(job)

    def _serving(self) -> bool:
        """After a loss, wait for the replica to come back; False (the worker ends) when it is gone."""
        if self.replica.state is ReplicaState.SERVING:
            return True
        self._close_batch()
        if not self.stopping and self.replica.rejoin():
            self._open_batch()
            return True
        self.pool.replica_gone()
        return False


class ReplicaPool(Worker):
    """The worker the service sees (core/worker.Worker's queue and positions), running no thread of its own."""

    def __init__(self, engines: list[Replica], max_batch_size: int):
        # What the front ends read of the model: every replica serves the same one.
        super().__init__(engines[0])  # one that serves (engines/replicas/cluster.py puts them first)
        self.max_batch_size = max_batch_size
        self.replicas = [ReplicaWorker(engine, max_batch_size, self) for engine in engines]
        self.gone = ""  # why no replica is left, once none is

    def start(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        for replica in self.replicas:
            replica.start(loop)

    def stop(self, timeout: float = 5.0) -> None:
        with self.lock:
            self.stopping = True
        for replica in self.replicas:
            replica.stop(timeout)
        for replica in self.replicas:
            if replica.replica.state is not ReplicaState.DEAD:
                replica.replica.unload()

    def alive(self) -> bool:
        return not self.stopping and bool(self.serving())

    def serving(self) -> list[ReplicaWorker]:
        return [replica for replica in self.replicas if replica.serving]

    def status(self) -> list[dict]:
        """Each replica: where it runs, its state, and the requests it holds."""
        with self.lock:
            return sorted(({**replica.replica.status(), "requests": replica.load(), "served": replica.served,
                            "slots": replica.max_batch_size} for replica in self.replicas),
                          key=lambda status: status["index"])  # those that loaded come first in self.replicas

    def replica_gone(self) -> None:
        """A replica is gone for good: with none left, what waits fails with the cause."""
        if any(replica.replica.state is not ReplicaState.DEAD for replica in self.replicas):
            return
        cause = "; ".join(replica.replica.status().get("cause", "") for replica in self.replicas)
        with self.lock:
            self.gone, waiting = cause, list(self.queue)
            self.queue.clear()
        log.error("no engine replica is left (%s): %d queued requests fail", cause, len(waiting))
        for job in waiting:
            self._refuse(job)

    def submit(self, job: Job) -> None:
        with self.lock:
            if not self.gone:
                return super().submit(job)
        self._refuse(job)

    def _refuse(self, job: Job) -> None:
        job.state = JobState.ENDED
        job.fail(f"No engine replica is left to run this: {self.gone}")

    def _starting_now(self) -> int:
        return min(len(self.queue), sum(replica.free_slots() for replica in self.serving()))

    def _busy(self) -> int:
        return int(not any(replica.free_slots() for replica in self.serving()))
