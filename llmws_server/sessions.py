"""Sessions: a per-session `seq`, the obfuscated buffer file, and delivery to whichever connection is live.

Every message that carries a `seq` is appended to var/sessions/<id>/buffer.jsonl *before* it is handed to
the connection, so whatever a client may have seen can be replayed after a drop.
"""
import asyncio
import base64
import binascii
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from . import protocol

log = logging.getLogger("llmws.sessions")

KEY = b"llmws"
TERMINAL_TYPES = {"done", "error", "train_done", "snapshot_saved"}  # a job's last message
UNUSED_IDLE_S = 300  # a session that never ran anything is forgotten this long after its client left
TAKEN_KEPT = 256  # request_ids a session remembers, to run a frame sent again after a cut only once


class SessionsFull(Exception):
    """Every session is in use: nobody's may be forgotten to make room."""


def simple_encrypt(data: str) -> str:
    """The seed's XOR + base64 obfuscation (not security)."""
    raw = data.encode("utf-8")
    return base64.b64encode(bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(raw))).decode("ascii")


def simple_decrypt(data: str) -> str:
    raw = base64.b64decode(data)
    return bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(raw)).decode("utf-8")


def parse_session_id(value) -> str | None:
    """The canonical form of a UUID, or None: nothing else may ever become a path."""
    if not isinstance(value, str):
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return str(parsed) if str(parsed) == value.lower() else None


class Session:
    def __init__(self, session_id: str, sessions_dir: Path, generation_defaults: dict):
        self.id = session_id
        self.buffer_file = sessions_dir / session_id / "buffer.jsonl"
        self.defaults = generation_defaults  # the server's, for the model loaded now
        self.overrides = {}  # what the session's `config` messages set
        self.seq = 0
        self.connection = None  # the live Connection, if any
        self.jobs = {}  # request_id -> job, queued or running
        self.taken = {}  # request_id -> fingerprint of the frame that started it, the latest TAKEN_KEPT
        self.buffer_failed = False
        self.buffer_bytes = 0  # written since the last ack
        self.detached_at = None  # when the last connection left, while none is live
        self.response = None  # for a stored response of the HTTP API: what its events are told with

    @property
    def config(self) -> dict:
        """The session's generation settings: its own over the server's defaults."""
        return {**self.defaults, **self.overrides}

    @property
    def label(self) -> str:
        """What logs name it by: the id is a secret (whoever has it reads the answers), a prefix is not."""
        return self.id[:8]

    def add_job(self, job, most: int) -> None:
        """Hold a queued or running request until its last message; ValueError for a full queue or an id
        already in use."""
        if len(self.jobs) >= most:
            raise protocol.Busy("Queue full")
        if job.request_id in self.jobs:
            raise ValueError(f"request_id {job.request_id} is already in use")
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

    def emit(self, message: dict) -> None:
        """A stream message: numbered, buffered, then sent if a connection is live."""
        self.seq += 1
        message["seq"] = self.seq
        self._append(message)
        if message["type"] in TERMINAL_TYPES and "request_id" in message:
            self.drop_job(message["request_id"])
        self.reply(message)

    def reply(self, message: dict) -> None:
        """A direct answer: not numbered, not buffered."""
        if self.connection is not None:
            self.connection.send(message)

    def attach(self, connection, welcome: dict, last_seq: int = 0) -> None:
        """Make `connection` the live one: welcome, then what it has not seen, then live messages.
        Nothing here awaits, so no message emitted meanwhile can fall between replay and live stream."""
        if self.connection is not None:
            self.connection.close(4000, "session taken over by another connection")
        connection.send(welcome)
        if self.seq > last_seq:
            connection.replay(self.buffered(last_seq, self.seq))
        self.connection = connection

    def detach(self, connection) -> None:
        if self.connection is connection:
            self.connection = None
            self.detached_at = time.monotonic()

    def buffered(self, after_seq: int, upto_seq: int):
        """The buffered messages with after_seq < seq <= upto_seq, read line by line as they are taken."""
        try:
            handle = self.buffer_file.open(encoding="utf-8")
        except OSError:
            return
        with handle:
            for line in handle:
                try:
                    message = json.loads(simple_decrypt(json.loads(line)["data"]))
                except (ValueError, KeyError, binascii.Error) as exc:
                    log.warning("session %s: skipping an unreadable buffer line (%s)", self.label, exc)
                    continue
                if message["seq"] > upto_seq:
                    return
                if message["seq"] > after_seq:
                    yield message

    def clear_buffer(self) -> None:
        shutil.rmtree(self.buffer_file.parent, ignore_errors=True)
        self.buffer_bytes = 0

    def _append(self, message: dict) -> None:
        line = json.dumps({"id": str(uuid.uuid4()), "data": simple_encrypt(json.dumps(message))})
        try:
            self.buffer_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Only the server's user may read a buffer: it holds the answers.
            with open(os.open(self.buffer_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a",
                      encoding="utf-8") as handle:
                handle.write(line + "\n")
            self.buffer_bytes += len(line) + 1
        except OSError as exc:  # a full disk must not stop the stream, but the client must know
            log.error("session %s: cannot write its buffer: %s", self.label, exc)
            if not self.buffer_failed:
                self.buffer_failed = True
                self.reply(protocol.error(f"Cannot write the session buffer ({exc.strerror or exc}): answers go "
                                          "on live, but cannot be resumed after a drop"))
            return
        self.buffer_failed = False


class SessionStore:
    def __init__(self, sessions_dir: Path, generation_defaults: dict, max_sessions: int = 1000):
        self.dir = sessions_dir
        self.generation_defaults = generation_defaults
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}

    def clear_all(self) -> None:
        """On server start: the seed clears every buffer."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def idle(self, now: float) -> list[tuple[float, Session]]:
        """(seconds idle, session) of the sessions with no client and nothing to run, longest idle first."""
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

    def open(self, requested_id=None) -> tuple[Session, bool]:
        """The session to take up, or a fresh one; the bool says whether it was taken up. At max_sessions,
        the longest idle session goes (one that never ran anything first); when none is idle, SessionsFull."""
        session_id = parse_session_id(requested_id)
        session = self.sessions.get(session_id) if session_id else None
        if session is not None:
            return session, True
        if len(self.sessions) >= self.max_sessions:
            idle = self.idle(time.monotonic())
            if not idle:
                raise SessionsFull(f"{len(self.sessions)} sessions are in use")
            unused = [session for _, session in idle if session.seq == 0]
            self.forget(unused[0] if unused else idle[0][1])
        session = Session(str(uuid.uuid4()), self.dir, self.generation_defaults)
        self.sessions[session.id] = session
        return session, False


class RequestSession:
    """An HTTP request's stand-in for a session: the worker's messages for it, queued on the event loop.
    Each request is its own lane in the fair queue; nothing is buffered, the connection is the stream."""

    buffer_bytes = 0

    def __init__(self):
        self.messages: asyncio.Queue = asyncio.Queue()
        self.jobs = {}

    def add_job(self, job, most: int) -> None:
        self.jobs[job.request_id] = job

    def drop_job(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)

    def emit(self, message: dict) -> None:
        self.messages.put_nowait(message)
