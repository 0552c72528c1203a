#!/usr/bin/env python3
"""Load and soak: N clients each send M greedy requests while their connections drop at random, all on
loopback, for a bounded time. Every request must either finish with the full, byte-identical text or be
refused with an error the client saw; anything else is counted as lost. Under the client, each resume must
replay from the last seq the client saw + 1 (bad_resumes counts those that did not).

    python bench/soak.py [--model models/SmolLM2-135M-Instruct] [--clients 10] [--requests 5] [--json out.json]
"""
import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, PeakMemory, free_port, start_server

sys.path.insert(0, str(REPO))
from llm import LLMWSEnhancedClient, LLMWSError  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to program computers."


class ResumeCheck:
    """The protocol under the client's de-duplication: it sees every message as it arrives (on_message), so
    a server that replayed what the client had seen, or skipped some, is caught even though the client
    would drop the repeats. On each connection seq must rise by one, and the first numbered message after a
    reconnect must be the last one seen + 1."""

    def __init__(self, results):
        self.results, self.seen, self.resumed = results, 0, False

    def message(self, message):
        seq = message.get("seq")
        if seq is None:
            return
        if seq != self.seen + 1:
            self.results["bad_resumes"].append(f"seq {seq} after {self.seen}"
                                               + (" (first after a reconnect)" if self.resumed else ""))
        elif self.resumed:
            self.results["resumes_checked"] += 1
        self.seen, self.resumed = max(self.seen, seq), False

    def status(self, text):
        if text == "reconnected":
            self.resumed = True


async def one_client(port, requests, max_tokens, drop_rate, reference, deadline, results, rng):
    check = ResumeCheck(results)
    client = LLMWSEnhancedClient("127.0.0.1", port, retries=10, on_message=check.message, on_status=check.status)
    await client.connect()
    for _ in range(requests):
        if time.monotonic() > deadline:
            break
        started, first, pieces = time.monotonic(), None, []
        try:
            async for piece in client.stream(PROMPT, temperature=0, max_new_tokens=max_tokens):
                first = first or time.monotonic()
                pieces.append(piece)
                if rng.random() < drop_rate / 10:  # the line dies mid-answer; the client must resume
                    client._websocket.transport.abort()
                    results["drops"] += 1
        except LLMWSError as exc:
            results["refused"].append(str(exc))
            continue
        except ConnectionError:
            results["lost"] += 1
            continue
        text = "".join(pieces)
        if text != reference:
            results["lost"] += 1
            continue
        results["completed"] += 1
        results["ttft"].append(first - started)
        results["tokens"] += client.last_done["total_tokens"]
    await client.disconnect()


async def soak(port, clients, requests, max_tokens, drop_rate, seconds, seed):
    async with LLMWSEnhancedClient("127.0.0.1", port) as client:
        reference = await client.inference(PROMPT, temperature=0, max_new_tokens=max_tokens)
    results = {"completed": 0, "lost": 0, "refused": [], "drops": 0, "ttft": [], "tokens": 0, "resumes_checked": 0,
               "bad_resumes": []}
    started = time.monotonic()
    await asyncio.gather(*(one_client(port, requests, max_tokens, drop_rate, reference, started + seconds, results,
                                      random.Random(seed + index)) for index in range(clients)))
    results["elapsed_s"] = time.monotonic() - started
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--drop-rate", type=float, default=0.3, help="chance a connection drops, per 10 pieces")
    parser.add_argument("--seconds", type=float, default=600, help="stop sending new requests after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="llmws-soak-") as folder:
        port = free_port()
        server = start_server(args.model, port, Path(folder))
        memory = PeakMemory(server.pid)
        try:
            results = asyncio.run(soak(port, args.clients, args.requests, args.max_tokens, args.drop_rate,
                                       args.seconds, args.seed))
        finally:
            memory.running = False
            server.terminate()
            server.wait(30)
    ttft = sorted(results.pop("ttft")) or [0.0]
    report = {**results, "refused": len(results["refused"]), "refusals": results["refused"][:5],
              "bad_resumes": len(results["bad_resumes"]), "bad_resume_examples": results["bad_resumes"][:5],
              "ttft_p50_s": round(statistics.median(ttft), 3),
              "ttft_p95_s": round(ttft[int(0.95 * (len(ttft) - 1))], 3),
              "tokens_per_s": round(results["tokens"] / results["elapsed_s"], 1),
              "server_peak_rss_mb": round(memory.peak / 1024 ** 2), "elapsed_s": round(results["elapsed_s"], 1),
              "clients": args.clients, "requests_per_client": args.requests}
    print(f"completed {report['completed']}  lost {report['lost']}  refused {report['refused']}  "
          f"drops {report['drops']}  resumes checked {report['resumes_checked']}  "
          f"bad resumes {report['bad_resumes']} {report['bad_resume_examples'] or ''}  "
          f"TTFT p50 {report['ttft_p50_s']} s  p95 {report['ttft_p95_s']} s  "
          f"{report['tokens_per_s']} tokens/s  server peak {report['server_peak_rss_mb']} MB  "
          f"in {report['elapsed_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["lost"] or report["bad_resumes"] else 0


if __name__ == "__main__":
    sys.exit(main())
