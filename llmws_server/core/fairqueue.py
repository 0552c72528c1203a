"""The waiting line: round-robin between sessions, first come first served within each.

One client's hundred queued requests do not put a newcomer at position 101: the newcomer's first request
goes after at most one request of every session already waiting.
"""
import collections


class FairQueue:
    def __init__(self):
        self.lanes: dict[object, collections.deque] = {}  # session -> its waiting jobs; dict order is the turn
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        """The jobs in the order they will start (if nothing is added or removed meanwhile)."""
        lanes = [list(lane) for lane in self.lanes.values()]
        for depth in range(max(map(len, lanes), default=0)):
            for lane in lanes:
                if depth < len(lane):
                    yield lane[depth]

    def append(self, job) -> None:
        self.lanes.setdefault(job.session, collections.deque()).append(job)
        self.count += 1

    def head(self):
        """The job that starts next."""
        return next(iter(self.lanes.values()))[0]

    def popleft(self):
        """Take the next job; its session's turn goes to the back of the line."""
        session, lane = next(iter(self.lanes.items()))
        job = lane.popleft()
        del self.lanes[session]
        if lane:
            self.lanes[session] = lane
        self.count -= 1
        return job

    def remove(self, job) -> None:
        """Take out a job that has not started; ValueError when it is not waiting."""
        lane = self.lanes.get(job.session)
        if lane is None:
            raise ValueError("not queued")
        lane.remove(job)
        if not lane:
            del self.lanes[job.session]
        self.count -= 1

    def of_session(self, session) -> list:
        return list(self.lanes.get(session, ()))

    def clear(self) -> None:
        self.lanes.clear()
        self.count = 0
