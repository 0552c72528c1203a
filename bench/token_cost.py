#!/usr/bin/env python3
"""The server's own cost per streamed token, without the model: Session.emit (seq, JSON, XOR+base64,
buffer append) and Connection.send (JSON, outbox) to a socket that takes everything at once; and the
cost of turning a batch's token ids into text, per token, at answer lengths from 128 to 2,048 tokens:
the incremental decoding the batch uses (engines.text.TextStream) against decoding the whole answer
again at every step (what it replaced).

    python bench/token_cost.py [--tokens 20000] [--model models/SmolLM2-135M-Instruct]
"""
import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmws_server.core.events import Stamped, Text  # noqa: E402
from llmws_server.sessions.file_buffer import FileBuffer  # noqa: E402
from llmws_server.sessions.store import Session  # noqa: E402
from llmws_server.ws.connection import Connection  # noqa: E402
from llmws_server.ws.wire import CODEC  # noqa: E402


class Sink:
    """Stands in for the network only: the cost measured is the server's, up to the socket."""

    async def send(self, text):
        pass

    async def close(self, code, reason):
        pass


async def measure(tokens: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        session_id = str(uuid.uuid4())
        session = Session(session_id, FileBuffer(Path(folder), session_id), CODEC, {})
        session.connection = Connection(Sink(), 1 << 40)
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        for index in range(tokens):
            session.emit(Stamped(Text(" word"), request_id))
            if index % 256 == 0:
                await asyncio.sleep(0)  # let the sender drain, as the event loop would between pieces
        while not session.connection.outbox.empty():
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - started
        session.connection.stop()
        return elapsed / tokens * 1e6


def decode_costs(model: Path, lengths=(128, 512, 2048)) -> list[tuple[int, float, float]]:
    """(answer length, µs a token incrementally, µs a token re-decoding the whole answer each step)."""
    from transformers import AutoTokenizer

    from llmws_server.engines.text import TextStream

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = " ".join(f"Ünïcode river {number}: the dragon wrote code, 🐉." for number in range(400))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    costs = []
    for length in lengths:
        answer = (ids * (length // len(ids) + 1))[:length]
        stream, started = TextStream(tokenizer), time.perf_counter()
        for step in range(1, length + 1):
            stream.follow(answer[:step])  # the batch hands over the whole list each step
        incremental = (time.perf_counter() - started) / length * 1e6
        started = time.perf_counter()
        for step in range(1, length + 1):
            tokenizer.decode(answer[:step], skip_special_tokens=True)
        whole = (time.perf_counter() - started) / length * 1e6
        costs.append((length, incremental, whole))
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--model",
                        default=str(Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    cost = asyncio.run(measure(args.tokens))
    print(f"server cost per token: {cost:.1f} µs ({args.tokens} tokens)")
    print("decoding, µs per token:  answer length  incremental  whole answer each step")
    for length, incremental, whole in decode_costs(Path(args.model)):
        print(f"{length:>38} {incremental:>12.1f} {whole:>23.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
