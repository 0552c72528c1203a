"""ws/connection.py against a fake websocket: no outgoing message can break a connection (#43.6)."""
import asyncio
import json

from llmws_server.ws.connection import Connection


class FakeSocket:
    """What Connection needs of a websocket: send, close and the address."""

    remote_address = ("127.0.0.1", 1)

    def __init__(self):
        self.sent: list[str] = []
        self.got = asyncio.Event()

    async def send(self, text: str) -> None:
        text.encode("utf-8")  # as the real one does: a str it cannot encode raises
        self.sent.append(text)
        self.got.set()

    async def close(self, code: int, reason: str) -> None:
        pass


async def test_no_outgoing_message_can_break_a_connection():
    websocket = FakeSocket()
    connection = Connection(websocket, 1 << 20)  # type: ignore[arg-type]
    connection.send({"type": "error", "message": "Unknown field(s): \udfff"})  # escaped, not dropped
    connection.send({"type": "log", "message": object()})  # cannot be JSON: an error is sent instead
    connection.send({"type": "pong"})
    while len(websocket.sent) < 3:
        websocket.got.clear()
        await asyncio.wait_for(websocket.got.wait(), 5)
    assert json.loads(websocket.sent[0])["message"] == "Unknown field(s): \udfff"
    assert json.loads(websocket.sent[1])["message"].startswith("Internal error: a reply could not be encoded")
    assert json.loads(websocket.sent[2]) == {"type": "pong"}
    assert not connection.sender.done()
    connection.stop()
