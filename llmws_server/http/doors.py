"""What every HTTP request passes before any API sees it (an ASGI middleware around the whole app): a body
declared over max_message_size refused with 413 before it is read, a cap on one address's requests at
once, and the fair-queue lane its requests share. (Connections are capped at accept: listeners.py.)

Lanes: every request of one HTTP client waits in one lane of the fair queue (core/fairqueue.py), as a
WebSocket session's requests do. A client is the token that authenticated it (auth_token or admin_token)
together with its address; with no token set, its address alone (a key the server does not know is not
an identity: anyone could send a new one with each request).
"""
import json
import logging
from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from llmws_server.access import same_secret
from llmws_server.sessions.store import CLIENT_LANE

log = logging.getLogger("llmws.http")
RETRY_AFTER_S = 1  # what a request refused for its address's requests at once is told to wait


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "?"


def declared_length(scope: Scope) -> int | None:
    """The Content-Length a request declares, or None (none, or not a number: the server reads the body
    no further than its limit then)."""
    value = dict(scope["headers"]).get(b"content-length", b"")
    return int(value) if value.isdigit() else None


def presented_key(headers: dict[bytes, bytes]) -> str:
    """The API key a request carries: Authorization: Bearer, else x-api-key (Anthropic's clients)."""
    bearer = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ")
    return bearer or headers.get(b"x-api-key", b"").decode("latin-1")


async def refuse(send: Send, status: int, message: str, kind: str, headers: dict[str, str]) -> None:
    """An answer in OpenAI's error shape, before any API has seen the request."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((name.encode(), value.encode()) for name, value in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Doors:
    def __init__(self, app: ASGIApp, server: dict, limits: dict):
        self.app = app
        self.server, self.limits = server, limits  # config.json's sections
        self.in_flight: Counter[str] = Counter()  # address -> its requests being answered (streams included)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = declared_length(scope)
        if length is not None and length > self.server["max_message_size"]:  # refused unread, and let go
            return await refuse(send, 413, f"Request body of {length} bytes is over {self.server['max_message_size']} "
                                "(server.max_message_size)", "invalid_request_error", {"connection": "close"})
        address = client_address(scope)
        most = self.limits["max_http_requests_per_ip"]
        if self.in_flight[address] >= most:
            return await refuse(send, 429, f"Too many requests at once from {address}: at most {most} "
                                f"(limits.max_http_requests_per_ip); retry once one has ended",
                                "rate_limit_error", {"retry-after": str(RETRY_AFTER_S)})
        self.in_flight[address] += 1
        lane = CLIENT_LANE.set(self.lane(scope, address))
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT_LANE.reset(lane)
            self.in_flight[address] -= 1
            if not self.in_flight[address]:
                del self.in_flight[address]

    def lane(self, scope: Scope, address: str) -> tuple[str, str | None, str]:
        """The request's client, as its lane key: ("http", which token authenticated it or None, address)."""
        presented = presented_key(dict(scope["headers"]))
        which = next((name for name in ("admin_token", "auth_token")
                      if self.server[name] and presented and same_secret(presented, self.server[name])), None)
        return "http", which, address
