#!/usr/bin/env python3
"""Hostile run: the attacks of issues #14 and #43 against a real server on loopback (the shipped limits,
both ports), each from 127.0.0.2 and up with a polite client beside it on 127.0.0.1.

    python bench/hostile.py [--model models/SmolLM2-135M-Instruct] [--json out.json] [--only NAME ...]

The polite client, over and over while an attack runs: a WebSocket session connects and streams 4 tokens,
then an HTTP client streams 4. One line per attack: held or BROKEN, the polite client's worst connect time
and time to first token, the server's peak RSS and open files, and what the attacker got. An attack is
held when it got what it must (a refusal, a close, a cap), the polite client connected within 2 s and had
its first token within 10 s every time, and the server's files stayed under its connection cap plus the
files it keeps. Exits 1 if any attack is broken.
"""
import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
from common import REPO, free_port, start_server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ATTACKER = "127.0.0.2"  # loopback too; the polite client is 127.0.0.1
CONNECT_LIMIT_S, FIRST_TOKEN_LIMIT_S = 2.0, 10.0
RESERVED_FILES = 256  # llmws_server/listeners.py: files kept besides connections
Attack = Callable[[], Awaitable[tuple[str, bool]]]


class Target:
    """The server under attack: its ports, its process, and what it is sampled for."""

    def __init__(self, port: int, http_port: int, pid: int, folder: Path):
        self.port, self.http_port, self.folder = port, http_port, folder
        self.url, self.http_url = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
        self.process = psutil.Process(pid)
        self.peak_rss = self.peak_fds = 0

    async def sample(self) -> None:
        while True:
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                self.peak_fds = max(self.peak_fds, self.process.num_fds())
            except psutil.Error:
                return
            await asyncio.sleep(0.1)

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient(base_url=self.http_url, timeout=30) as http:
            text = (await http.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def settle(self, timeout: float = 120) -> None:
        """Wait until nothing is queued (what an attack left runs out before the next one)."""
        deadline = time.monotonic() + timeout
        while await self.metric("llmws_queue_depth") > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)


class Polite:
    """The polite client: rounds of a WebSocket answer and an HTTP stream, worst times kept."""

    def __init__(self, target: Target):
        self.target = target
        self.connect_s = self.first_token_s = 0.0
        self.problems: list[str] = []
        self.rounds = 0

    async def run(self) -> None:
        while True:
            for kind, round_trip in (("ws", self.websocket_round), ("http", self.http_round)):
                try:
                    connected, first = await asyncio.wait_for(round_trip(), 60)
                    self.connect_s, self.first_token_s = max(self.connect_s, connected), max(self.first_token_s, first)
                except Exception as exc:  # a refusal, a timeout, a close: all count against the attack's
                    self.problems.append(f"{kind}: {type(exc).__name__} {str(exc)[:80]}")
                    await asyncio.sleep(0.5)
            self.rounds += 1
            await asyncio.sleep(0.3)

    async def websocket_round(self) -> tuple[float, float]:
        begun = time.monotonic()
        async with connect(self.target.url, open_timeout=30) as ws:
            await ws.send("{}")
            assert json.loads(await ws.recv())["type"] == "welcome"
            connected = time.monotonic() - begun
            asked = time.monotonic()
            await ws.send(json.dumps({"type": "inference", "prompt": {"user": "Say hello"},
                                      "config": {"max_new_tokens": 4, "temperature": 0}}))
            first = None
            while True:
                reply = json.loads(await ws.recv())
                if reply["type"] == "token" and first is None:
                    first = time.monotonic() - asked
                if reply["type"] == "error":
                    raise RuntimeError(reply["message"])
                if reply["type"] == "done":
                    return connected, first if first is not None else time.monotonic() - asked

    async def http_round(self) -> tuple[float, float]:
        body = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4,
                "temperature": 0, "stream": True}
        begun = time.monotonic()
        async with httpx.AsyncClient(base_url=self.target.http_url, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                connected = time.monotonic() - begun
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        return connected, time.monotonic() - begun
        return connected, time.monotonic() - begun


# -- the attacks: each returns what the attacker got and whether that is as it must be --------------------

async def open_from(address: str, port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    opened = []
    for _ in range(count):
        try:
            opened.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port,
                                                                         local_addr=(address, 0)), 5))
        except (OSError, asyncio.TimeoutError):
            break
    return opened


async def got(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sent (b"" once it closed), or None while it says nothing."""
    try:
        return await asyncio.wait_for(reader.read(4096), timeout)
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        return b""


def attacks(target: Target) -> dict[str, Attack]:
    async def idle_http() -> tuple[str, bool]:
        held = await open_from(ATTACKER, target.http_port, 3000)
        first = await asyncio.gather(*(got(reader, 0.5) for reader, _ in held))
        admitted = [pair for pair, text in zip(held, first) if text is None]
        await asyncio.sleep(12)  # past hello_timeout_s
        later = await asyncio.gather(*(got(reader, 0.1) for reader, _ in admitted))
        for _, writer in held:
            writer.close()
        closed = sum(text is not None for text in later)
        return (f"{len(held)} idle HTTP connections: {len(admitted)} admitted, {len(held) - len(admitted)} "
                f"refused (503), {closed} of the admitted closed by the deadline", len(admitted) <= 64
                and closed == len(admitted))

    async def slow_requests() -> tuple[str, bool]:
        held = await open_from(ATTACKER, target.http_port, 40)
        for index, (_, writer) in enumerate(held):
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         + (b"Content-Length: 300\r\n\r\n{" if index % 2 else b""))
        begun, open_now = time.monotonic(), len(held)
        while open_now and time.monotonic() - begun < 20:
            for index, (_, writer) in enumerate(held):
                if not writer.is_closing():
                    writer.write(b"x" if index % 2 else b"X-Slow: 1\r\n")
            await asyncio.sleep(1)
            open_now = sum(text is None for text in await asyncio.gather(*(got(reader, 0.01) for reader, _ in held)))
        for _, writer in held:
            writer.close()
        took = time.monotonic() - begun
        return f"{len(held)} half headers or dribbled bodies: all closed after {took:.0f} s", open_now == 0

    async def huge_body() -> tuple[str, bool]:
        reader, writer = (await open_from(ATTACKER, target.http_port, 1))[0]
        begun = time.monotonic()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n\r\n")
        text = await got(reader, 5) or b""
        writer.close()
        return f"Content-Length 99,999,999,999: {text[:12].decode()} in {time.monotonic() - begun:.2f} s", \
            text.startswith(b"HTTP/1.1 413")

    async def queue_flood() -> tuple[str, bool]:
        ws = await connect(target.url, local_addr=(ATTACKER, 0), max_size=None)
        await ws.send("{}")
        await ws.recv()
        for index in range(400):
            await ws.send(json.dumps({"type": "inference", "prompt": {"user": "spam"}, "request_id": f"s{index}",
                                      "config": {"max_new_tokens": 16, "temperature": 0}}))
            if index >= 90:
                await asyncio.sleep(1 / 45)  # under the rate limit after its burst
        await asyncio.sleep(3)
        await ws.close()  # detached: its queued requests still count as its own
        await asyncio.sleep(5)
        return "400 requests from one session, then gone", True

    async def http_parallel() -> tuple[str, bool]:
        body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 16, "stream": True}
        transport = httpx.AsyncHTTPTransport(local_address=ATTACKER)
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=target.http_url, timeout=120, transport=transport, limits=limits) as http:
            async def one() -> int:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    await response.aread()
                    return response.status_code
            statuses = await asyncio.gather(*(one() for _ in range(200)), return_exceptions=True)
        ok = [status for status in statuses if status == 200]
        refused = [status for status in statuses if status == 429]
        return (f"200 parallel streams from one address: {len(ok)} answered, {len(refused)} refused (429), "
                f"{200 - len(ok) - len(refused)} refused at accept"), len(ok) <= 64

    async def http_hang_ups() -> tuple[str, bool]:
        cancelled = await target.metric("llmws_requests_total", outcome="cancelled")
        held = await open_from(ATTACKER, target.http_port, 40)
        data = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400}).encode()
        for _, writer in held:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        await asyncio.sleep(2)
        refused = sum(bool(text) for text in await asyncio.gather(*(got(reader, 0.01) for reader, _ in held)))
        for _, writer in held:
            writer.close()
        await asyncio.sleep(3)
        now = await target.metric("llmws_requests_total", outcome="cancelled")
        return (f"40 whole-answer requests hung up: {now - cancelled:.0f} cancelled, {refused} refused at once",
                now - cancelled + refused >= len(held) - 4)  # a few may not have started yet: they leave the queue

    async def surrogates() -> tuple[str, bool]:
        ws = await connect(target.url, local_addr=(ATTACKER, 0))
        await ws.send("{}")
        await ws.recv()
        replies = []
        for frame in ('{"type":"ping","\\udfff":1}', '{"type":"config","data":{"\\ud800":1}}',
                      '{"type":"inference","prompt":{"user":"\\ud800"}}'):
            await ws.send(frame)
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        await ws.send('{"type":"ping"}')
        alive = json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "pong"
        await ws.close()
        async with httpx.AsyncClient(base_url=target.http_url, timeout=30) as http:
            status = (await http.post("/v1/chat/completions", headers={"content-type": "application/json"},
                                      content=b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}')
                      ).status_code
        return (f"lone surrogates: {sum(r['type'] == 'error' for r in replies)} errors, connection "
                f"{'open' if alive else 'closed'}, HTTP {status}", alive and status == 400
                and all(r["type"] == "error" for r in replies))

    async def doubled_headers() -> tuple[str, bool]:
        statuses = []
        for port, extra in ((target.port, b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"), (target.http_port, b"")):
            for doubled in (b"Origin: http://localhost\r\n" * 2, b"Authorization: Bearer x\r\n" * 2):
                reader, writer = (await open_from(ATTACKER, port, 1))[0]
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + doubled + b"\r\n")
                statuses.append(int(((await got(reader, 5)) or b"HTTP/1.1 0").split()[1]))
                writer.close()
        return f"doubled Origin and Authorization on both ports: HTTP {statuses}", set(statuses) == {400}

    async def rebinding() -> tuple[str, bool]:
        statuses = []
        for port, path in ((target.port, b"/"), (target.http_port, b"/v1/models"), (target.http_port, b"/metrics")):
            reader, writer = (await open_from(ATTACKER, port, 1))[0]
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: rebound.example:8000\r\n\r\n")
            statuses.append(int(((await got(reader, 5)) or b"HTTP/1.1 0").split()[1]))
            writer.close()
        return f"Host rebound.example on /, /v1/models, /metrics: HTTP {statuses}", set(statuses) == {403}

    async def cors() -> tuple[str, bool]:
        async with httpx.AsyncClient(base_url=target.http_url, timeout=30) as http:
            asked = {"Access-Control-Request-Method": "POST"}
            foreign = (await http.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                                           **asked})).status_code
            listed = (await http.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                                          **asked})).status_code
        return f"preflights: foreign origin {foreign}, listed origin {listed}", (foreign, listed) == (403, 204)

    async def idle_websockets() -> tuple[str, bool]:
        idle = []
        for address in ("127.0.0.2", "127.0.0.3"):
            for _ in range(5):
                try:
                    ws = await connect(target.url, local_addr=(address, 0))
                    await ws.send("{}")
                    await ws.recv()
                    idle.append(ws)
                except (ConnectionClosed, InvalidStatus):
                    break
        await asyncio.sleep(8)  # the polite client's rounds need room among them
        closed = sum(ws.close_code == 4001 for ws in idle)
        for ws in idle:
            await ws.close()
        return f"{len(idle)} idle sessions filling max_clients: {closed} closed (4001) to let newcomers in", True

    async def legacy_tags() -> tuple[str, bool]:
        ws = await connect(target.url, local_addr=(ATTACKER, 0), max_size=None)
        await ws.send("{}")
        await ws.recv()
        await ws.send(json.dumps({"type": "inference", "prompt": "<|user|>" * 131072}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
        await ws.close()
        return f"1 MB of <|user|>: {reply['message'][:50]}", reply["type"] == "error"

    async def tiny_arrays() -> tuple[str, bool]:
        ws = await connect(target.url, local_addr=(ATTACKER, 0), max_size=None)
        await ws.send("{}")
        await ws.recv()
        await ws.send("[" + ",".join(["[]"] * (4 * 1024 * 1024 // 3 - 1)) + "]")
        reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
        await ws.close()
        return f"a 4 MB frame of []: {reply['message'][:50]}", reply["type"] == "error"

    async def second_server() -> tuple[str, bool]:
        result = await asyncio.to_thread(subprocess.run, [sys.executable, str(REPO / "llmws.py"), "--config",
                                         str(target.folder / "config.json"), "--port", str(target.port)],
                                         capture_output=True, text=True, timeout=120)
        line = result.stderr.strip()
        return f"a second server on the port: rc {result.returncode}, {line[:60]!r}", \
            result.returncode != 0 and len(line.splitlines()) == 1

    return {"idle HTTP connections": idle_http, "slow requests": slow_requests, "huge Content-Length": huge_body,
            "queue flood": queue_flood, "HTTP parallel streams": http_parallel, "HTTP hang-ups": http_hang_ups,
            "lone surrogates": surrogates, "doubled headers": doubled_headers, "DNS rebinding": rebinding,
            "CORS": cors, "idle WebSockets": idle_websockets, "legacy tags": legacy_tags,
            "tiny arrays": tiny_arrays, "second server": second_server}


async def run(target: Target, only: list[str]) -> list[dict]:
    rows = []
    cap = min(1024, target.process.rlimit(psutil.RLIMIT_NOFILE)[0] - RESERVED_FILES) + RESERVED_FILES
    for name, attack in attacks(target).items():
        if only and name not in only:
            continue
        await target.settle()
        target.peak_rss = target.peak_fds = 0
        polite, sampler = Polite(target), asyncio.create_task(target.sample())
        politely = asyncio.create_task(polite.run())
        try:
            outcome, ok = await attack()
        except Exception as exc:
            outcome, ok = f"the attack failed: {type(exc).__name__} {exc}", False
        while polite.rounds < 2 and not politely.done():  # beside the attack's end too
            await asyncio.sleep(0.2)
        politely.cancel()
        sampler.cancel()
        held = (ok and not polite.problems and polite.connect_s <= CONNECT_LIMIT_S
                and polite.first_token_s <= FIRST_TOKEN_LIMIT_S and target.peak_fds < cap)
        rows.append({"attack": name, "held": held, "polite_connect_s": round(polite.connect_s, 2),
                     "polite_first_token_s": round(polite.first_token_s, 2),
                     "peak_rss_mb": round(target.peak_rss / 2 ** 20), "peak_fds": target.peak_fds,
                     "outcome": outcome, "polite_problems": polite.problems[:3]})
        print(f"{'held  ' if held else 'BROKEN'} {name:22} polite connect {polite.connect_s:5.2f} s, first token "
              f"{polite.first_token_s:5.2f} s | RSS {rows[-1]['peak_rss_mb']:5d} MB, fds {target.peak_fds:5d} | "
              f"{outcome}{'; polite: ' + '; '.join(polite.problems[:2]) if polite.problems else ''}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", nargs="*", default=[], help="run only these attacks (their names as printed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port, http_port = free_port(), free_port()
        server = start_server(args.model, port, Path(folder), {"server": {"host": "127.0.0.1",
                                                                          "http_port": http_port}})
        try:
            rows = asyncio.run(run(Target(port, http_port, server.pid, Path(folder)), args.only))
        finally:
            server.terminate()
            server.wait(30)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["held"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
