"""What every HTTP request passes before any API sees it (an ASGI middleware around the whole app): doubled
headers (400), a Host that is not this server's (403, against DNS rebinding) and a body declared over
max_message_size (413) refused before anything is read; CORS for the pages of server.allowed_origins (their
preflights answered, their answers readable) and no other; a cap on one address's requests at once; and the
fair-queue lane its requests share. (Connections are capped at accept: llmws_server/listeners.py.)

Lanes: every request of one HTTP client waits in one lane of the fair queue (core/fairqueue.py), as a
WebSocket session's requests do. A client is the token that authenticated it (auth_token or admin_token)
together with its address; with no token set, its address alone (a key the server does not know is not
an identity: anyone could send a new one with each request).
"""
import json
import logging
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmws_server.access import doubled_header, host_allowed, origin_allowed, same_secret
from llmws_server.sessions.store import CLIENT_LANE

log = logging.getLogger("llmws.http")
RETRY_AFTER_S = 1  # what a request refused for its address's requests at once is told to wait
PREFLIGHT_HEADERS = "authorization, content-type, x-api-key"  # allowed when a preflight names none
QUEUE_HEADER = "x-llmws-queue-position"  # http/runs.py's, readable by an allowed page


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "?"


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (the first, where it came more than once), or None."""
    value = next((value for key, value in scope["headers"] if key == name), None)
    return value.decode("latin-1") if value is not None else None


def declared_length(scope: Scope) -> int | None:
    """The Content-Length a request declares, or None (none, or not a number: the server reads the body
    no further than its limit then)."""
    value = header(scope, b"content-length") or ""
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
        problem = self.problem(scope)
        if problem is not None:
            return await refuse(send, *problem)
        origin = header(scope, b"origin")
        if scope["method"] == "OPTIONS" and origin is not None and header(scope, b"access-control-request-method"):
            return await self.preflight(send, origin, header(scope, b"access-control-request-headers"))
        address = client_address(scope)
        most = self.limits["max_http_requests_per_ip"]
        if self.in_flight[address] >= most:
            return await refuse(send, 429, f"Too many requests at once from {address}: at most {most} "
                                f"(limits.max_http_requests_per_ip); retry once one has ended",
                                "rate_limit_error", {"retry-after": str(RETRY_AFTER_S)})
        self.in_flight[address] += 1
        lane = CLIENT_LANE.set(self.lane(scope, address))
        try:
            await self.app(scope, receive, self.with_cors(send, origin))
        finally:
            CLIENT_LANE.reset(lane)
            self.in_flight[address] -= 1
            if not self.in_flight[address]:
                del self.in_flight[address]

    def problem(self, scope: Scope) -> tuple[int, str, str, dict[str, str]] | None:
        """Why a request is refused before anything is read of it: a doubled header (400), a Host that is
        not this server's (403: DNS rebinding), a body declared over max_message_size (413); or None."""
        doubled = doubled_header(name.decode("latin-1") for name, _ in scope["headers"])
        if doubled:
            return 400, f"The {doubled} header must come once", "invalid_request_error", {"connection": "close"}
        host = header(scope, b"host")
        if not host_allowed(host, self.server["allowed_hosts"]):
            return (403, f"Host {host} is not served here: use an IP address or localhost, or list the name in "
                    "server.allowed_hosts", "permission_error", {})
        length = declared_length(scope)
        if length is not None and length > self.server["max_message_size"]:  # refused unread, and let go
            return (413, f"Request body of {length} bytes is over {self.server['max_message_size']} "
                    "(server.max_message_size)", "invalid_request_error", {"connection": "close"})
        return None

    async def preflight(self, send: Send, origin: str, asked_headers: str | None) -> None:
        """A browser's CORS preflight: allowed for server.allowed_origins (their pages may call the API),
        refused (403) for any other."""
        if not origin_allowed(origin, self.server["allowed_origins"]):
            return await refuse(send, 403, f"Origin {origin} is not allowed (server.allowed_origins)",
                                "permission_error", {"vary": "origin"})
        allowed = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin"),
                   (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                   (b"access-control-allow-headers", (asked_headers or PREFLIGHT_HEADERS).encode("latin-1")),
                   (b"access-control-max-age", b"600"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": allowed})
        await send({"type": "http.response.body", "body": b""})

    def with_cors(self, send: Send, origin: str | None) -> Send:
        """`send`, telling a page of an allowed origin that it may read the answer."""
        if origin is None or not origin_allowed(origin, self.server["allowed_origins"]):
            return send

        async def send_readable(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"access-control-expose-headers", QUEUE_HEADER.encode()),
                                                  (b"vary", b"origin")]}
            await send(message)
        return send_readable

    def lane(self, scope: Scope, address: str) -> tuple[str, str | None, str]:
        """The request's client, as its lane key: ("http", which token authenticated it or None, address)."""
        presented = presented_key(dict(scope["headers"]))
        which = next((name for name in ("admin_token", "auth_token")
                      if self.server[name] and presented and same_secret(presented, self.server[name])), None)
        return "http", which, address
