"""Streamed answers that outlive their connection: a client that drops comes back for the rest.

A kept stream is a session of the store (sessions/store.py): counted in limits.max_sessions, its buffer in
var/sessions/<id>/, forgotten a day after it ended. Each data event is numbered and buffered before it is
sent, and goes out with `id: <answer id>/<n>`. The run belongs to the stream, not to the connection: when
its last reader leaves, it goes on for limits.stream_resume_s seconds, and is cancelled if nobody has come
back by then. Coming back is the SSE standard's `Last-Event-ID` (a browser's EventSource sends it by itself)
on the POST again, or on `GET .../{answer id}/events` (`?after=N` too): the events after n, then the live
ones, with no gap and no duplicate. Queue positions are comments, unnumbered (an SSE comment carries no id):
each change goes to whoever reads live, and a reader that comes while the answer waits is told its place.
"""
import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from llmws_server.core.events import Event, Stamped
from llmws_server.errors import SessionsFull
from llmws_server.http.errors import APIError
from llmws_server.sessions.store import Session, SessionStore

log = logging.getLogger("llmws.http")
RETRY_MS = 1000  # how long an EventSource waits before it reconnects
FIRST_READ_S = 1.0  # what a new stream's first reader has to begin, however short limits.stream_resume_s is
PREFIXES = ("chatcmpl-", "cmpl-")  # the answer ids of chat completions and completions
Live = tuple[int | None, ServerSentEvent | None]  # (seq, event) to live readers; seq None: a comment


def sse(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """An SSE response as every API here sends one (a ping comment every 15 s)."""
    return EventSourceResponse(events, ping=15, sep="\n")


class KeptStream:
    """One streamed answer (its session's `response`): its run, which writes the events, and its readers."""

    def __init__(self, session: Session, answer_id: str, resume_s: float):
        self.session, self.answer_id, self.resume_s = session, answer_id, resume_s
        self.readers: set[asyncio.Queue[Live]] = set()
        self.ended = False
        self.run: asyncio.Task | None = None
        self.orphaned: asyncio.TimerHandle | None = None
        self.place: ServerSentEvent | None = None  # the last queue comment, while nothing came after it

    # sessions.store.Listener: it holds the session (not idle) while it runs; the events are its own
    def deliver(self, stamped: Stamped, record: dict) -> None:
        """Nothing is emitted on a kept stream's session: its events are kept records."""

    def notify(self, event: Event) -> None:
        """A buffer that cannot be written: the readers still get every event live."""

    def taken_over(self) -> None:
        """Nobody takes an HTTP stream's session over (SessionStore.open)."""

    def start(self, events: AsyncIterator[ServerSentEvent]) -> None:
        """Run it: from now on it is cancelled once nobody has read it for resume_s seconds (or for
        FIRST_READ_S, for its first reader to begin)."""
        self.session.attach(self)
        self.run = asyncio.create_task(self._keep(events))
        self._orphan(max(self.resume_s, FIRST_READ_S))

    async def _keep(self, events: AsyncIterator[ServerSentEvent]) -> None:
        """Buffer and tell each event; cancelled (nobody came back), the stream ends with an error event."""
        try:
            async for event in events:
                self._tell(event)
        except asyncio.CancelledError:
            log.info("stream %s cancelled: no client read it for %s s", self.answer_id[:16], self.resume_s)
            error = {"error": {"message": f"Cancelled: no client read this stream for {self.resume_s} s "
                                          "(limits.stream_resume_s)", "type": "client_closed_request"}}
            self._tell(ServerSentEvent(data=json.dumps(error)))
            self._tell(ServerSentEvent(data="[DONE]"))
        finally:
            self.ended = True
            for reader in self.readers:
                reader.put_nowait((None, None))
            self.session.detach(self)

    def _tell(self, event: ServerSentEvent) -> None:
        seq = None if event.data is None else self.session.keep({"data": event.data})
        if seq is None or self.place is not None:  # the place holds until a data event follows it
            self.place = event if seq is None else None
        for reader in self.readers:
            reader.put_nowait((seq, event))

    def _numbered(self, seq: int, data: str, retry: bool) -> ServerSentEvent:
        return ServerSentEvent(data=data, id=f"{self.answer_id}/{seq}", retry=RETRY_MS if retry else None)

    async def read(self, after: int) -> AsyncIterator[ServerSentEvent]:
        """The events numbered above `after` (those buffered, then the live ones while it runs). A reader
        subscribes before it reads the buffer and skips what the buffer gave: nothing falls between."""
        reader: asyncio.Queue[Live] = asyncio.Queue()
        live, upto, first = not self.ended, self.session.seq, True
        if live:
            self.readers.add(reader)
            if self.orphaned is not None:
                self.orphaned.cancel()
        try:
            for record in self.session.records(after, upto):
                yield self._numbered(record["seq"], record["data"], first)
                first = False
            if live and self.place is not None:  # a reader that comes while it waits learns its place
                yield self.place
            while live:
                seq, event = await reader.get()
                if event is None:
                    return
                if seq is None:
                    yield event
                elif seq > max(upto, after):
                    yield self._numbered(seq, str(event.data), first)
                    first = False
        finally:
            self.readers.discard(reader)
            if live and not self.readers and not self.ended:
                self._orphan(self.resume_s)

    def _orphan(self, after_s: float) -> None:
        self.orphaned = asyncio.get_running_loop().call_later(after_s, self._cancel_if_orphaned)

    def _cancel_if_orphaned(self) -> None:
        if not self.readers and self.run is not None:
            self.run.cancel()


def keep(store: SessionStore, prefix: str, resume_s: float) -> KeptStream:
    """A new kept stream for an answer whose id starts with `prefix`; 429 when the sessions are full."""
    try:
        session, _ = store.open()
    except SessionsFull as exc:
        raise APIError(f"Server full: {exc}", status=429, kind="rate_limit_error") from None
    session.response = KeptStream(session, prefix + uuid.UUID(session.id).hex, resume_s)
    return session.response


def kept(store: SessionStore, answer_id: str, prefix: str) -> KeptStream:
    """The kept stream of an answer id (of this kind of answer), or 404."""
    session = None
    if answer_id.startswith(prefix):
        try:
            session = store.sessions.get(str(uuid.UUID(hex=answer_id[len(prefix):])))
        except ValueError:
            pass
    stream = getattr(session, "response", None)
    if not isinstance(stream, KeptStream):
        raise APIError(f"No stream found with id '{answer_id[:64]}' (a stream is kept for a day after it ends, "
                       "and not over a restart)", "id", status=404, kind="not_found_error")
    return stream


def after_event(last_event_id: str) -> tuple[str, int]:
    """A Last-Event-ID (`<answer id>/<n>`) as the answer id and n; 400 for anything else."""
    answer_id, _, number = last_event_id.strip().rpartition("/")
    if not answer_id or not number.isdigit() or len(number) > 12:
        raise APIError("Last-Event-ID must be an event id this server sent: <answer id>/<number>", "Last-Event-ID")
    return answer_id, int(number)
