"""Who may hold a connection, on both ports alike, checked when it is accepted: at most
`limits.max_connections` at once across the WebSocket and the HTTP port, and `max_connections_per_ip` from
one address; the total stays under the open-files limit with room for the server's own files. The HTTP
port also closes a connection that has not sent a request's headers and body within `hello_timeout_s`
(the WebSocket port's handshake has the same deadline). An error that repeats is logged once with a count.

A refused connection gets a one-line 503 and is closed before anything of it is read.
"""
import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from websockets.asyncio.server import ServerConnection

log = logging.getLogger("llmws.listeners")
RESERVED_FILES = 256  # open files kept for session buffers, models, logs and threads: no connection takes them
REPEAT_WINDOW_S = 60.0  # an error repeated within this long is counted, not logged again


class RepeatedLog:
    """Logs the first of each kind of message, then counts the repeats and says how many at the next one
    after REPEAT_WINDOW_S: a flood of the same error is a few lines, not a line per event."""

    def __init__(self, logger: logging.Logger, window_s: float = REPEAT_WINDOW_S):
        self.logger, self.window_s = logger, window_s
        self.kinds: dict[str, tuple[float, int]] = {}  # kind -> (when it was last logged, repeats since)

    def __call__(self, kind: str, emit: Callable[[str], None]) -> None:
        """Log `kind` by calling emit(note) (note says how often it repeated), or count it."""
        now = time.monotonic()
        logged_at, repeats = self.kinds.get(kind, (-self.window_s, 0))
        if now - logged_at < self.window_s:
            self.kinds[kind] = (logged_at, repeats + 1)
            return
        self.kinds[kind] = (now, 0)
        emit(f" (and {repeats} more times in the last {self.window_s:g} s)" if repeats else "")

    def loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An event loop's exception handler: asyncio's own report, once per kind (e.g. accept() failing for
        want of file descriptors)."""
        exception = context.get("exception")
        kind = f"{context.get('message', 'error')}: {type(exception).__name__ if exception else ''}"
        self(kind, lambda note: loop.default_exception_handler({**context, "message": context.get("message", "")
                                                                 + note}))


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, wanted, exc)
            return soft, soft
    return soft, max(soft, wanted)


class ConnectionPolicy:
    """The connections held now, by address, across both ports."""

    def __init__(self, total: int, per_address: int):
        self.total, self.per_address = total, per_address
        self.held: Counter[str] = Counter()
        self.count = 0
        self.repeated = RepeatedLog(log)

    @classmethod
    def from_limits(cls, limits: dict, open_files: int) -> "ConnectionPolicy":
        """The caps of config.json's limits, the total kept RESERVED_FILES under the open-files limit."""
        return cls(max(1, min(limits["max_connections"], open_files - RESERVED_FILES)),
                   limits["max_connections_per_ip"])

    def admit(self, address: str) -> str | None:
        """Count a new connection in, or say why it is refused (and count nothing)."""
        if self.count >= self.total:
            problem = f"Server full: {self.total} connections (limits.max_connections)"
        elif self.held[address] >= self.per_address:
            problem = f"Too many connections from {address}: {self.per_address} (limits.max_connections_per_ip)"
        else:
            self.held[address] += 1
            self.count += 1
            return None
        kind = problem.split(":")[0]
        self.repeated(kind, lambda note: log.warning("refused a connection: %s%s", problem, note))
        return problem

    def release(self, address: str) -> None:
        self.count -= 1
        self.held[address] -= 1
        if not self.held[address]:
            del self.held[address]


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else "?"


def refuse(transport: asyncio.BaseTransport, problem: str) -> None:
    """A one-line 503 (which says why) and the connection closed, nothing of it read."""
    body = f"{problem}: try again later\n".encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(head + body)
    transport.close()


def guarded_http(policy: ConnectionPolicy, deadline_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol under the policy, with a deadline for each request's headers and body:
    from the connection (or the first byte of a request after the last one) until the request is whole."""

    class GuardedHTTP(H11Protocol):
        admitted: str | None = None  # the address it was counted under
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            address = peer_address(transport)
            problem = policy.admit(address)
            if problem:
                self.transport = transport
                refuse(transport, problem)
                return
            self.admitted = address
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self.admitted is None:
                return
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.admitted is None:
                return
            if self.deadline is not None:
                self.deadline.cancel()
            policy.release(self.admitted)
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Arm the deadline while a request is being received; disarm it once it is whole."""
            receiving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            if receiving and self.deadline is None and not self.transport.is_closing():
                self.deadline = self.loop.call_later(deadline_s, self._too_slow)
            elif not receiving and self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _too_slow(self) -> None:
            self.deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                policy.repeated("slow", lambda note: log.info(
                    "closed an HTTP connection from %s: no whole request within %s s (limits.hello_timeout_s)%s",
                    self.admitted, deadline_s, note))
                self.transport.close()

    return GuardedHTTP


def guarded_websocket(policy: ConnectionPolicy) -> type[ServerConnection]:
    """websockets' server connection under the policy (its handshake has open_timeout for a deadline)."""

    class GuardedWebSocket(ServerConnection):
        admitted: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            address = peer_address(transport)
            problem = policy.admit(address)
            super().connection_made(transport)  # its handler ends at once: the handshake finds it closed
            if problem:
                refuse(transport, problem)
            else:
                self.admitted = address

        def connection_lost(self, exc: Exception | None) -> None:
            if self.admitted is not None:
                policy.release(self.admitted)
                self.admitted = None
            super().connection_lost(exc)

    return GuardedWebSocket
