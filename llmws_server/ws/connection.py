"""One client socket: an ordered outbox, a replay streamed from the session buffer, and a rate limit.

Emitting never waits on the network: live messages go to the outbox, and a client that leaves more than
`outbox_limit` bytes of them unread is let go (the buffer keeps everything for its resume). A replay is read
from the buffer file a chunk at a time as the socket takes it, so a long session costs no memory to catch up.
"""
import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from llmws_server.core.events import Event, Stamped
from llmws_server.core.requests import is_text
from llmws_server.sessions.store import Session
from llmws_server.ws import wire

log = logging.getLogger("llmws.connection")
MESSAGES_PER_SECOND, MESSAGE_BURST = 50, 100
REPLAY_CHUNK = 256  # buffered messages read from disk at a time


def wire_text(message: dict) -> str:
    """A message as the JSON text a socket can always take: UTF-8 as it is, unless some string in it is
    not Unicode text (a lone surrogate), when the whole is written in ASCII escapes instead."""
    text = json.dumps(message, ensure_ascii=False)
    return text if is_text(text) else json.dumps(message)


def remote_address(websocket: ServerConnection) -> str:
    """The client's IP address ("?" when the transport no longer knows it)."""
    remote = websocket.remote_address
    return remote[0] if remote else "?"


class Connection:
    """A session's listener (sessions.store.Listener) on a WebSocket."""

    allowance: float  # within_rate's bucket: messages it may send now

    def __init__(self, websocket: ServerConnection, outbox_limit: int):
        self.websocket = websocket
        self.outbox: asyncio.Queue[str | Iterator[dict]] = asyncio.Queue()
        self.outbox_bytes, self.outbox_limit = 0, outbox_limit
        self.sender = asyncio.create_task(self._send_all())
        self.allowance, self.checked_at = MESSAGE_BURST, time.monotonic()  # checked_at: its last frame's time
        self.session: Session | None = None  # the session it serves, once its hello is read
        self.dropped = False
        self.admin_problem: str | None = None  # why it may not manage models, or None
        self.embedding: set[asyncio.Task] = set()  # its embed requests being answered

    @property
    def address(self) -> str:
        return remote_address(self.websocket)

    def idle_for(self, now: float) -> float | None:
        """How long it has sent nothing while its session has nothing queued or running; None when busy."""
        if self.session is not None and self.session.jobs:
            return None
        return now - self.checked_at

    def deliver(self, stamped: Stamped, record: dict) -> None:
        """A session's numbered event, as it was buffered."""
        self.send(record)

    def notify(self, event: Event) -> None:
        self.send(wire.message(event))

    def taken_over(self) -> None:
        self.close(4000, "session taken over by another connection")

    def send(self, message: dict) -> None:
        """Queue a live message. One that cannot be written as JSON is a bug: logged, and the client is told
        instead, so no message can break the connection."""
        if self.dropped:
            return
        try:
            text = wire_text(message)
        except (TypeError, ValueError):
            log.exception("cannot send a %s message", message.get("type"))
            text = wire_text({"type": "error", "message": "Internal error: a reply could not be encoded (the "
                                                          "server's log has the details)"})
        if self.outbox_bytes + len(text) > self.outbox_limit:  # it does not read: let it go
            self.dropped = True
            log.warning("dropping a client that does not read (%d bytes waiting)", self.outbox_bytes)
            self.close(1013, "Client too slow: reconnect with last_seq to resume")
            return
        self.outbox_bytes += len(text)
        self.outbox.put_nowait(text)

    def replay(self, messages: Iterator[dict]) -> None:
        """Queue a replay: `messages` is an iterator over buffered messages, read as the socket drains."""
        self.outbox.put_nowait(messages)

    def within_rate(self) -> bool:
        """A token bucket: MESSAGES_PER_SECOND on average, bursts of MESSAGE_BURST."""
        now = time.monotonic()
        self.allowance = min(MESSAGE_BURST, self.allowance + (now - self.checked_at) * MESSAGES_PER_SECOND)
        self.checked_at = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True

    def close(self, code: int, reason: str) -> None:
        asyncio.create_task(self.websocket.close(code, reason))

    async def _send_all(self) -> None:
        """Send the outbox in order until the connection closes; a message that fails otherwise is logged
        and skipped, and the rest go on."""
        try:
            while True:
                item = await self.outbox.get()
                try:
                    if isinstance(item, str):
                        await self.websocket.send(item)
                        self.outbox_bytes -= len(item)
                    else:
                        await self._send_replay(item)
                except ConnectionClosed:
                    raise
                except Exception:
                    log.exception("a message could not be sent: skipped")
        except ConnectionClosed:
            pass  # what was not sent is in the session buffer

    async def _send_replay(self, messages: Iterator[dict]) -> None:
        while chunk := await asyncio.to_thread(lambda: list(itertools.islice(messages, REPLAY_CHUNK))):
            for message in chunk:
                await self.websocket.send(wire_text(message))  # waits while the socket is full

    def stop(self) -> None:
        self.sender.cancel()
