#!/usr/bin/env python3
"""The server's own cost per streamed token, without the model: Session.emit (seq, JSON, XOR+base64,
buffer append) and Connection.send (JSON, outbox) to a socket that takes everything at once.

    python bench/token_cost.py [--tokens 20000]
"""
import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmws_server.connection import Connection  # noqa: E402
from llmws_server.sessions import Session  # noqa: E402


class Sink:
    """Stands in for the network only: the cost measured is the server's, up to the socket."""

    async def send(self, text):
        pass

    async def close(self, code, reason):
        pass


async def measure(tokens: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        session = Session(str(uuid.uuid4()), Path(folder), {})
        session.connection = Connection(Sink(), 1 << 40)
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        for index in range(tokens):
            session.emit({"type": "token", "data": " word", "request_id": request_id})
            if index % 256 == 0:
                await asyncio.sleep(0)  # let the sender drain, as the event loop would between pieces
        while not session.connection.outbox.empty():
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - started
        session.connection.stop()
        return elapsed / tokens * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    cost = asyncio.run(measure(args.tokens))
    print(f"server cost per token: {cost:.1f} µs ({args.tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
