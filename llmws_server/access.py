"""Who may use the server, for both front ends: browser origins and secrets compared in constant time."""
import hmac
from urllib.parse import urlsplit


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    """An Origin matches a listed one exactly, or by scheme and host with any port."""
    if origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
        return f"{parts.scheme}://{parts.hostname}" in allowed
    except ValueError:  # not a URL at all (e.g. "http://[")
        return False


def same_secret(presented: str, secret: str) -> bool:
    return hmac.compare_digest(presented.encode(), secret.encode())
