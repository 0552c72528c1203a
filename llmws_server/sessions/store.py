"""Sessions: a per-session `seq`, its buffer, and delivery to whichever listener is live.

Every event that gets a `seq` is appended to the session's buffer *before* it is handed to the listener,
so whatever a client may have seen can be replayed after a drop. The buffer keeps each event as its
front end's record (the codec: for the WebSocket front end, the seed protocol's JSON), so a replay sends
exactly what was sent live.

A new store (Redis Streams, say) is one module with a Buffer class, passed as `buffer_type`.
"""
import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from llmws_server.core.events import Event, Failed, Queued, Stamped, Started, TrainStarted
from llmws_server.errors import Busy, Refused, SessionsFull
from llmws_server.sessions.file_buffer import FileBuffer, clear_all, clear_all_of

log = logging.getLogger("llmws.sessions")

# The fair-queue lane of the client whose request is being handled, for a front end whose clients have no
# session of their own (the HTTP one sets it per request: http/doors.py); None: each request its own lane.
CLIENT_LANE: ContextVar[object] = ContextVar("llmws_client_lane", default=None)
UNUSED_IDLE_S = 300  # a session that never ran anything is forgotten this long after its client left
STOPPED = "The server stopped before this request ended: what it sent is all there is; send it again"
JOB_OPENINGS = (Queued, Started, TrainStarted)  # a job's first event: it runs until its terminal one
TAKEN_KEPT = 256  # request_ids a session remembers, to run a frame sent again after a cut only once


def _written_at(file: Path) -> float | None:
    try:
        return file.stat().st_mtime
    except OSError:
        return None


class Codec(Protocol):
    """How events are kept in a buffer, and read back."""

    def encode(self, stamped: Stamped) -> dict: ...

    def decode(self, record: dict) -> Stamped: ...


class Buffer(Protocol):
    def append(self, record: dict) -> int: ...

    def records(self, label: str) -> Iterator[dict]: ...

    def clear(self) -> None: ...


class Listener(Protocol):
    """Who is told a session's events as they happen: a WebSocket connection, a stored response's readers."""

    def deliver(self, stamped: Stamped, record: dict) -> None: ...

    def notify(self, event: Event) -> None:
        """An event that is not numbered nor buffered (the buffer cannot be written)."""

    def taken_over(self) -> None:
        """Another listener took the session: this one gets nothing more."""


def parse_session_id(value: object) -> str | None:
    """The canonical form of a UUID, or None: nothing else may ever become a path."""
    if not isinstance(value, str):
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return str(parsed) if str(parsed) == value.lower() else None


class Session:
    def __init__(self, session_id: str, buffer: Buffer, codec: Codec, generation_defaults: dict):
        self.id = session_id
        self.buffer, self.codec = buffer, codec
        self.defaults = generation_defaults  # the server's, for the model loaded now
        self.overrides: dict = {}  # what the session's `config` messages set
        self.seq = 0
        self.connection: Listener | None = None  # the live listener, if any
        self.jobs: dict[str, Any] = {}  # request_id -> job, queued or running
        self.taken: dict[str, str] = {}  # request_id -> fingerprint of the frame that started it
        self.buffer_failed = False
        self.buffer_bytes = 0  # written since the last ack
        self.detached_at: float | None = None  # when the last listener left, while none is live
        self.response: Any = None  # an HTTP API's kept answer (a stored response, a kept stream): what tells it
        self.lane: object = None  # the fair queue's lane its jobs wait in (core/fairqueue.lane_of); None: its own
        self.closed = False  # the server is stopping: nothing more is told

    @property
    def config(self) -> dict:
        """The session's generation settings: its own over the server's defaults."""
        return {**self.defaults, **self.overrides}

    @property
    def label(self) -> str:
        """What logs name it by: the id is a secret (whoever has it reads the answers), a prefix is not."""
        return self.id[:8]

    def add_job(self, job: Any, most: int) -> None:
        """Hold a queued or running request until its last event; refused for a full queue or an id in use."""
        if len(self.jobs) >= most:
            raise Busy("Queue full")
        if job.request_id in self.jobs:
            raise Refused(f"request_id {job.request_id} is already in use", "request_id")
        self.jobs[job.request_id] = job

    def drop_job(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)

    def is_a_retry(self, request_id: str, fingerprint: str) -> bool:
        """The same frame with the same request_id, taken before: a client sending it again after a cut
        that may have lost it. It does not run twice; the resume replays what it started."""
        return self.taken.get(request_id) == fingerprint

    def take(self, request_id: str, fingerprint: str) -> str | None:
        """Note a frame as taken (before it is acted on: its repeat may come while it still is); returns
        what the id noted before, for `untake` when the frame is refused."""
        previous = self.taken.pop(request_id, None)
        self.taken[request_id] = fingerprint
        while len(self.taken) > TAKEN_KEPT:
            self.taken.pop(next(iter(self.taken)))
        return previous

    def untake(self, request_id: str, previous: str | None) -> None:
        """A refused frame was not taken: sent again, it may run."""
        self.taken.pop(request_id, None)
        if previous is not None:
            self.taken[request_id] = previous

    def emit(self, stamped: Stamped) -> Stamped:
        """A stream event: numbered, buffered, then delivered if a listener is live (none once closed)."""
        if self.closed:
            return stamped
        self.seq += 1
        numbered = replace(stamped, seq=self.seq)
        record = self.codec.encode(numbered)
        self._append(record)
        if numbered.terminal and numbered.request_id is not None:
            self.drop_job(numbered.request_id)
        if self.connection is not None:
            self.connection.deliver(numbered, record)
        return numbered

    def keep(self, record: dict) -> int:
        """A record a front end keeps as it is (an HTTP stream's event): numbered and buffered; its seq."""
        self.seq += 1
        self._append({"seq": self.seq, **record})
        return self.seq

    def attach(self, listener: Listener) -> None:
        """Make `listener` the live one (the one before is told it was taken over). The caller sends what
        the listener has not seen (records) first, with no await between, so nothing falls between."""
        if self.connection is not None:
            self.connection.taken_over()
        self.connection = listener
        self.detached_at = None

    def detach(self, listener: object) -> None:
        if self.connection is listener:
            self.connection = None
            self.detached_at = time.monotonic()

    def records(self, after_seq: int, upto_seq: int) -> Iterator[dict]:
        """The buffered records with after_seq < seq <= upto_seq, read as they are taken."""
        for record in self.buffer.records(self.label):
            if record["seq"] > upto_seq:
                return
            if record["seq"] > after_seq:
                yield record

    def buffered(self, after_seq: int, upto_seq: int) -> Iterator[Stamped]:
        """The same, as events."""
        return (self.codec.decode(record) for record in self.records(after_seq, upto_seq))

    def clear_buffer(self) -> None:
        self.buffer.clear()
        self.buffer_bytes = 0

    def _append(self, record: dict) -> None:
        try:
            self.buffer_bytes += self.buffer.append(record)
        except OSError as exc:  # a full disk must not stop the stream, but the client must know
            log.error("session %s: cannot write its buffer: %s", self.label, exc)
            if not self.buffer_failed and self.connection is not None:
                self.connection.notify(Failed(f"Cannot write the session buffer ({exc.strerror or exc}): answers go "
                                              "on live, but cannot be resumed after a drop"))
            self.buffer_failed = True
            return
        self.buffer_failed = False


class SessionStore:
    def __init__(self, sessions_dir: Path, generation_defaults: dict, codec: Codec, max_sessions: int = 1000,
                 buffer_type: Callable[[Path, str], Buffer] = FileBuffer):
        self.dir = sessions_dir
        self.generation_defaults = generation_defaults
        self.codec, self.buffer_type = codec, buffer_type
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}

    def clear_all(self) -> None:
        """On server start: the seed clears every buffer."""
        clear_all(self.dir)

    def close(self) -> None:
        """On a clean stop, before the worker stops: each request that has not ended ends with an error that
        says so (buffered, so a client back after a restart learns it), and nothing more is told."""
        for session in self.sessions.values():
            for request_id in list(session.jobs):
                session.emit(Stamped(Failed(STOPPED), request_id))
            session.closed = True

    def restore(self, kept_s: float) -> int:
        """On server start with server.keep_sessions_over_restart: the sessions whose buffers were written in
        the last kept_s seconds (the newest max_sessions) are taken up again as they were left, each request
        that had not ended ending now with an error that says so; the other buffers go. Returns how many."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now, found = time.time(), []
        for folder in self.dir.iterdir():
            written = _written_at(folder / "buffer.jsonl")
            if parse_session_id(folder.name) == folder.name and written is not None and now - written < kept_s:
                found.append((written, folder))
            else:
                clear_all_of(folder)
        found.sort(reverse=True)
        for written, folder in found[self.max_sessions:]:
            clear_all_of(folder)
        restored = [self._restored(folder.name, time.monotonic() - (now - written)) for written, folder in
                    found[:self.max_sessions]]
        return sum(session is not None for session in restored)

    def _restored(self, session_id: str, detached_at: float) -> Session | None:
        """A session read back from its buffer, or None (its buffer gone) for one that is not a WebSocket
        session's (an HTTP API's kept answer is not kept over a restart)."""
        session = Session(session_id, self.buffer_type(self.dir, session_id), self.codec, self.generation_defaults)
        running: dict[str, None] = {}
        try:
            for record in session.buffer.records(session.label):
                stamped = self.codec.decode(record)
                session.seq = max(session.seq, stamped.seq or 0)
                if stamped.request_id is not None and stamped.terminal:
                    running.pop(stamped.request_id, None)
                elif stamped.request_id is not None and isinstance(stamped.event, JOB_OPENINGS):
                    running[stamped.request_id] = None
        except (KeyError, TypeError, ValueError):
            session.clear_buffer()
            return None
        for request_id in running:
            session.emit(Stamped(Failed(STOPPED), request_id))
        session.detached_at = detached_at
        self.sessions[session_id] = session
        return session

    def idle(self, now: float) -> list[tuple[float, Session]]:
        """(seconds idle, session) of the sessions with no listener and nothing to run, longest idle first."""
        idle = [(now - session.detached_at, session) for session in self.sessions.values()
                if session.connection is None and not session.jobs and session.detached_at is not None]
        return sorted(idle, key=lambda pair: -pair[0])

    def forget(self, session: Session) -> None:
        session.clear_buffer()
        self.sessions.pop(session.id, None)

    def expire(self, idle_s: float, now: float | None = None) -> int:
        """Forget, with their buffers, the sessions nobody has taken up for idle_s seconds (UNUSED_IDLE_S
        for those that never ran anything) and that run nothing. Returns how many went."""
        now = time.monotonic() if now is None else now
        gone = [session for seconds, session in self.idle(now)
                if seconds > (UNUSED_IDLE_S if session.seq == 0 else idle_s)]
        for session in gone:
            self.forget(session)
        return len(gone)

    def open(self, requested_id: object = None) -> tuple[Session, bool]:
        """The session to take up, or a fresh one; the bool says whether it was taken up. At max_sessions,
        the longest idle session goes (one that never ran anything first); when none is idle, SessionsFull."""
        session_id = parse_session_id(requested_id)
        session = self.sessions.get(session_id) if session_id else None
        if session is not None and session.response is None:  # an HTTP API's kept answer is that API's
            return session, True
        if len(self.sessions) >= self.max_sessions:
            idle = self.idle(time.monotonic())
            if not idle:
                raise SessionsFull(f"{len(self.sessions)} sessions are in use")
            unused = [session for _, session in idle if session.seq == 0]
            self.forget(unused[0] if unused else idle[0][1])
        new_id = str(uuid.uuid4())
        session = Session(new_id, self.buffer_type(self.dir, new_id), self.codec, self.generation_defaults)
        self.sessions[session.id] = session
        return session, False


class StreamSession:
    """An HTTP request's stand-in for a session: its events, queued on the event loop. Its jobs wait in its
    client's lane of the fair queue (`lane`: given, else the client whose request is being handled, else a
    lane of its own); nothing is buffered, the connection is the stream."""

    buffer_bytes = 0

    def __init__(self, lane: object = None) -> None:
        self.events: asyncio.Queue[Stamped] = asyncio.Queue()
        self.jobs: dict[str, Any] = {}
        self.lane = lane if lane is not None else CLIENT_LANE.get()

    def add_job(self, job: Any, most: int) -> None:
        self.jobs[job.request_id] = job

    def drop_job(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)

    def emit(self, stamped: Stamped) -> Stamped:
        self.events.put_nowait(stamped)
        return stamped
