"""The HTTP side of a connection, before any frame: the web client page, browser origins, tokens, and
whether a connection may manage models (the admin scope)."""
import logging
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from llmws_server.access import doubled_header, host_allowed, is_loopback, origin_allowed, same_secret

log = logging.getLogger("llmws.handshake")
# The page runs its own inline script and talks to WebSocket servers only; no other site may frame it.
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src ws: wss:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
WEB_CLIENT = Path(__file__).resolve().parents[2] / "web_client_enhanced.html"


class Handshake:
    def __init__(self, server_settings: dict):
        self.settings = server_settings  # config.json's "server" section

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse a doubled Host, Origin or Authorization (400) and a Host that is not this server's (403,
        against DNS rebinding); serve the web client to a plain GET of /; refuse browsers from other origins
        (403) and, with auth_token set, wrong tokens (401)."""
        doubled = doubled_header(name for name, _ in request.headers.raw_items())
        if doubled:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"The {doubled} header must come once\n")
        host = request.headers.get("Host")
        if not host_allowed(host, self.settings["allowed_hosts"]):
            log.warning("refused a request for host %s", host[:80] if host else host)
            return connection.respond(HTTPStatus.FORBIDDEN, f"Host {host} is not served here: use an IP address or "
                                                            "localhost, or list the name in server.allowed_hosts\n")
        if "upgrade" not in request.headers.get("Connection", "").lower():
            return self.page(connection, request)
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, self.settings["allowed_origins"]):
            log.warning("refused a connection from origin %s", origin)
            return connection.respond(HTTPStatus.FORBIDDEN, f"Origin {origin} is not allowed\n")
        token, admin = self.settings["auth_token"], self.settings["admin_token"]
        if token and not (same_secret(presented_token(request), token) or
                          (admin and same_secret(presented_token(request), admin))):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Missing or wrong token\n")
        return None

    def admin_problem(self, request: Request, address: str) -> str | None:
        """Why this connection (from `address`) may not manage models, or None when it may. Management needs
        the admin token when one is set, and without one a loopback address (this machine); from a browser
        it needs the server's own page (or a listed admin origin)."""
        admin = self.settings["admin_token"]
        if admin and not same_secret(presented_token(request), admin):
            return "connect with the admin token (server.admin_token) to manage models"
        if not admin and not is_loopback(address):
            return ("without server.admin_token, models are managed only from this machine (a loopback address): "
                    "set an admin token to manage them from elsewhere")
        origin = request.headers.get("Origin")
        if origin is None or origin in self.settings["admin_origins"]:
            return None
        try:
            own_page = urlsplit(origin).netloc == request.headers.get("Host")
        except ValueError:
            own_page = False
        return None if own_page else (f"pages on {origin} may not manage models: use the server's own page "
                                      "or list the origin in server.admin_origins")

    def page(self, connection: ServerConnection, request: Request) -> Response:
        """GET (or HEAD) of / is the web client; nothing else is served."""
        if request.method not in ("GET", "HEAD"):
            response = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "Only GET and HEAD are served here\n")
            response.headers["Allow"] = "GET, HEAD"
            return response
        if urlsplit(request.path).path not in ("/", "/index.html", "/web_client_enhanced.html"):
            return connection.respond(HTTPStatus.NOT_FOUND, "Not found: the web client is at /\n")
        response = connection.respond(HTTPStatus.OK, WEB_CLIENT.read_text(encoding="utf-8"))
        del response.headers["Content-Type"]  # respond() made it text/plain
        response.headers.update(PAGE_HEADERS)
        if request.method == "HEAD":
            response.body = b""  # the headers, Content-Length included, as GET has them
        return response


def presented_token(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):]
    return parse_qs(urlsplit(request.path).query).get("token", [""])[0]
