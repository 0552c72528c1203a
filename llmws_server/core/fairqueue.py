"""The waiting line: round-robin between lanes, first come first served within each.

A lane is one client's: a WebSocket session, or an HTTP client (its key and address: the `lane` of its
requests' StreamSessions). One client's hundred queued requests do not put a newcomer at position 101:
the newcomer's first request goes after at most one request of every lane already waiting.
"""
import collections
from collections.abc import Iterator

from llmws_server.core.jobs import Job
from llmws_server.sessions.store import Session, StreamSession


def lane_of(session: object) -> object:
    """The lane a session's jobs wait in: its `lane` key where it has one, else the session itself."""
    return getattr(session, "lane", None) or session


class FairQueue:
    def __init__(self) -> None:
        self.lanes: dict[object, collections.deque[Job]] = {}  # lane -> its waiting jobs; dict order is the turn
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Job]:
        """The jobs in the order they will start (if nothing is added or removed meanwhile)."""
        lanes = [list(lane) for lane in self.lanes.values()]
        for depth in range(max(map(len, lanes), default=0)):
            for lane in lanes:
                if depth < len(lane):
                    yield lane[depth]

    def append(self, job: Job) -> None:
        self.lanes.setdefault(lane_of(job.session), collections.deque()).append(job)
        self.count += 1

    def head(self) -> Job:
        """The job that starts next."""
        return next(iter(self.lanes.values()))[0]

    def popleft(self) -> Job:
        """Take the next job; its lane's turn goes to the back of the line."""
        key, lane = next(iter(self.lanes.items()))
        job = lane.popleft()
        del self.lanes[key]
        if lane:
            self.lanes[key] = lane
        self.count -= 1
        return job

    def remove(self, job: Job) -> None:
        """Take out a job that has not started; ValueError when it is not waiting."""
        key = lane_of(job.session)
        lane = self.lanes.get(key)
        if lane is None:
            raise ValueError("not queued")
        lane.remove(job)
        if not lane:
            del self.lanes[key]
        self.count -= 1

    def of_session(self, session: Session | StreamSession) -> list[Job]:
        return [job for job in self.lanes.get(lane_of(session), ()) if job.session is session]

    def waiting_in(self, lane: object) -> int:
        """How many jobs wait in a lane."""
        return len(self.lanes.get(lane, ()))

    def fullest(self) -> Job | None:
        """The newest job of the lane holding the most (the first such in turn), or None when empty: the
        one a newcomer's request takes the place of when the queue is full."""
        lane = max(self.lanes.values(), key=len, default=None)
        return lane[-1] if lane else None

    def clear(self) -> None:
        self.lanes.clear()
        self.count = 0
