"""Who may use the server, for both front ends: browser origins, the Host a request names, loopback
addresses, headers that must come once, and secrets compared in constant time."""
import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

SINGLE_HEADERS = ("host", "origin", "authorization", "x-api-key")  # twice is ambiguous: refused with 400


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    """An Origin matches a listed one exactly; an entry listed without a port matches any port of its
    scheme and host."""
    if origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
        return f"{parts.scheme}://{parts.hostname}" in allowed
    except ValueError:  # not a URL at all (e.g. "http://[")
        return False


def same_secret(presented: str, secret: str) -> bool:
    return hmac.compare_digest(presented.encode(), secret.encode())


def host_allowed(host: str | None, allowed: list[str]) -> bool:
    """Whether the Host a request names may be served: an IP address, localhost (or a name under it), a
    name in server.allowed_hosts, or anything when that lists "*". A page on another domain that rebinds
    its name to this machine names its own domain, and is refused (DNS rebinding). No Host (HTTP/1.0) is
    not a browser's."""
    if host is None or "*" in allowed:
        return True
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:  # e.g. "[" or a port that is not a number
        return False
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in (entry.lower() for entry in allowed):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """Whether a remote address is this machine's own (127.0.0.0/8, ::1, or IPv4-mapped 127.x)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def doubled_header(names: Iterable[str]) -> str | None:
    """The first of SINGLE_HEADERS that `names` (a request's header names, in any case) holds twice."""
    seen: set[str] = set()
    for name in names:
        lowered = name.lower()
        if lowered in SINGLE_HEADERS:
            if lowered in seen:
                return lowered
            seen.add(lowered)
    return None
