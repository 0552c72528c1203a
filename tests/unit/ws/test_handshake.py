"""ws/handshake.py without a socket: without an admin token, models are managed from loopback only."""
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from llmws_server.config import DEFAULTS
from llmws_server.ws.handshake import Handshake


@pytest.mark.parametrize("address, admin_token, may", [
    ("127.0.0.1", None, True), ("127.0.0.2", None, True), ("::1", None, True), ("::ffff:127.0.0.1", None, True),
    ("10.0.0.5", None, False), ("192.168.1.20", None, False), ("10.0.0.5", "admin", True)])
def test_without_an_admin_token_models_are_managed_from_loopback_only(address, admin_token, may):
    settings = {**DEFAULTS["server"], "admin_token": admin_token}
    request = Request("/", Headers({"Host": "x", **({"Authorization": "Bearer admin"} if admin_token else {})}))
    problem = Handshake(settings).admin_problem(request, address)
    assert (problem is None) == may, problem
    if not may:
        assert "server.admin_token" in problem and "loopback" in problem
