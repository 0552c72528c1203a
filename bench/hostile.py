#!/usr/bin/env python3
"""Hostile run: the attacks of issue #14 against a real server on loopback, while a probe client measures
how long the event loop stalls and a bystander's answer is checked byte for byte.

    python bench/hostile.py [--model models/SmolLM2-135M-Instruct] [--json out.json]

Each attack prints the longest probe round trip during it (an upper bound on the stall) and its outcome.
Exits 1 if any stall passes 1 s, a connection is closed with 1011, a newcomer is locked out, or the
bystander's answer differs from the same request made alone.
"""
import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import REPO, free_port, start_server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

STALL_LIMIT_S = 1.0


class Probe:
    """Sends an ack every 50 ms and keeps the longest round trip since the last reset."""

    def __init__(self, url):
        self.url, self.worst, self.task = url, 0.0, None

    async def start(self):
        self.ws = await connect(self.url)
        await self.ws.send("{}")
        await self.ws.recv()
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        while True:
            sent = time.monotonic()
            await self.ws.send('{"type": "ack"}')
            while json.loads(await self.ws.recv())["type"] != "ack_received":
                pass
            self.worst = max(self.worst, time.monotonic() - sent)
            await asyncio.sleep(0.05)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


async def hello(url, **kwargs):
    ws = await connect(url, max_size=None, **kwargs)
    await ws.send("{}")
    welcome = json.loads(await ws.recv())
    return ws, welcome


async def reply_to(ws, frame: str) -> dict:
    await ws.send(frame)
    return json.loads(await asyncio.wait_for(ws.recv(), 120))


async def answer(ws, message: dict) -> str:
    await ws.send(json.dumps(message))
    text = ""
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 300))
        if reply["type"] == "token":
            text += reply["data"]
        if reply["type"] in ("done", "error"):
            return text


async def attacks(url: str, port: int, server_pid: int, folder: Path):
    """(name, coroutine) pairs; each coroutine returns an outcome line and whether it is as it must be."""
    async def legacy_tags():
        ws, _ = await hello(url)
        replies = [await reply_to(ws, json.dumps({"type": "inference", "prompt": "<|user|>" * 131072}))
                   for _ in range(2)]
        ok = all(r["type"] == "error" and "max_context" in r for r in replies)
        return f"1 MB of <|user|> twice: {replies[0]['message'][:60]}", ok and await still_open(ws)

    async def tiny_arrays():
        ws, _ = await hello(url)
        frame = "[" + ",".join(["[]"] * (4 * 1024 * 1024 // 3 - 1)) + "]"
        replies = [await reply_to(ws, frame) for _ in range(3)]
        return f"three 4 MB frames of []: {replies[0]['message'][:60]}", await still_open(ws)

    async def malformed():
        ws, _ = await hello(url)
        frames = ["1" * 5001, '{"type":"config","data":{"temperature":1%s}}' % ("0" * 400),
                  '{"type":"inference","messages":[{"role":[],"content":"x"}]}',
                  '{"type":"inference","messages":[{"role":{},"content":"x"}]}', '{"type":"%s"}' % ("x" * 10 ** 6)]
        replies = [await reply_to(ws, frame) for frame in frames]
        ok = all(r["type"] == "error" and len(r["message"]) < 500 for r in replies)
        return f"{len(frames)} malformed frames: {sum(r['type'] == 'error' for r in replies)} errors", \
            ok and await still_open(ws)

    async def origins():
        statuses = []
        for origin in ("http://[", "null", "https://evil.example"):
            try:
                (await connect(url, origin=origin)).transport.abort()
                statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
        ws, _ = await hello(url, origin="http://localhost:3000")
        managed = await reply_to(ws, json.dumps({"type": "delete_model", "model_name": "x"}))
        ok = statuses == [403, 403, 403] and "may not manage models" in managed["message"]
        await ws.close()
        return f"bad, null, foreign origins: HTTP {statuses}; management from localhost:3000 refused", ok

    async def queue_flood():
        blocker, _ = await hello(url)
        await blocker.send(json.dumps({"type": "inference", "prompt": {"user": "go"}, "request_id": "b",
                                       "config": {"max_new_tokens": 4000, "temperature": 0}}))
        flooder, _ = await hello(url)
        received = 0
        for index in range(300):
            await flooder.send(json.dumps({"type": "inference", "prompt": {"user": "x"}, "request_id": f"f{index}"}))
            if index % 90 == 89:
                await asyncio.sleep(2)  # under the rate limit
        await asyncio.sleep(2)
        for index in range(300):
            await flooder.send(json.dumps({"type": "cancel", "request_id": f"f{index}"}))
            if index % 90 == 89:
                await asyncio.sleep(2)
        await blocker.send(json.dumps({"type": "cancel", "request_id": "b"}))
        await asyncio.sleep(1)
        while True:
            try:
                received += json.loads(await asyncio.wait_for(flooder.recv(), 1))["type"] == "queued"
            except asyncio.TimeoutError:
                break
        newcomer, _ = await hello(url)
        text = await answer(newcomer, {"type": "inference", "prompt": {"user": "hi"},
                                       "config": {"max_new_tokens": 8, "temperature": 0}})
        for websocket in (blocker, flooder, newcomer):
            await websocket.close()
        return f"300 queued then cancelled: {received} queued messages; a newcomer answered", bool(text)

    async def silent_connections():
        silent = [await connect(url) for _ in range(10)]
        started = time.monotonic()
        while True:
            try:
                ws, _ = await hello(url)
                break
            except (ConnectionClosed, InvalidStatus):
                await asyncio.sleep(0.2)
        waited = time.monotonic() - started
        for websocket in silent:
            websocket.transport.abort()
        await ws.close()
        return f"10 connections that never say hello: a newcomer got in after {waited:.1f} s", waited < 15

    async def replay_to_non_readers():
        ws, welcome = await hello(url)
        await answer(ws, {"type": "inference", "prompt": {"user": "Tell me a long story"},
                          "config": {"max_new_tokens": 2000, "temperature": 0}})
        await ws.close()
        before = psutil.Process(server_pid).memory_info().rss
        readers = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            payload = json.dumps({"session_id": welcome["session_id"], "last_seq": 0}).encode()
            mask = os.urandom(4)
            sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                         + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            readers.append(sock)
        await asyncio.sleep(3)
        grown = (psutil.Process(server_pid).memory_info().rss - before) / 2 ** 20
        for sock in readers:
            sock.close()
        return f"3 non-readers resume a 2000-token session: server memory +{grown:.0f} MB", grown < 100

    async def second_server():
        result = await asyncio.to_thread(subprocess.run, [sys.executable, str(REPO / "llmws.py"), "--config",
                                         str(folder / "config.json"), "--port", str(port)],
                                         capture_output=True, text=True, timeout=120)
        line = result.stderr.strip()
        return f"second server on the port: rc {result.returncode}, {line!r}", \
            result.returncode != 0 and len(line.splitlines()) == 1 and "in use" in line

    return [("legacy tags", legacy_tags), ("tiny arrays", tiny_arrays), ("malformed", malformed),
            ("origins", origins), ("queue flood", queue_flood), ("silent connections", silent_connections),
            ("replay", replay_to_non_readers), ("second server", second_server)]


async def still_open(ws) -> bool:
    """The connection still answers; it is closed here, its part done."""
    alive = (await reply_to(ws, '{"type": "ack"}'))["type"] == "ack_received"
    await ws.close()
    return alive


async def run(url, port, pid, folder) -> list[dict]:
    bystander, _ = await hello(url)
    request = {"type": "inference", "prompt": {"user": "Write about rivers"},
               "config": {"max_new_tokens": 200, "temperature": 0}}
    alone = await answer(bystander, request)
    during = asyncio.create_task(answer(bystander, request))
    probe = Probe(url)
    await probe.start()
    rows = []
    for name, attack in await attacks(url, port, pid, folder):
        probe.take()
        try:
            outcome, ok = await attack()
        except ConnectionClosed as exc:
            outcome, ok = f"closed: {exc}", False
        stall = probe.take()
        rows.append({"attack": name, "stall_s": round(stall, 3), "outcome": outcome,
                     "ok": bool(ok) and stall <= STALL_LIMIT_S})
        print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} {name:20} stall {stall * 1000:7.0f} ms  {outcome}", flush=True)
    same = await during == alone
    rows.append({"attack": "bystander", "stall_s": 0, "outcome": "answer identical to alone" if same else "DIFFERS",
                 "ok": same})
    print(f"{'ok  ' if same else 'FAIL'} {'bystander':20} {rows[-1]['outcome']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        server = start_server(args.model, port, Path(folder), {"server": {"host": "127.0.0.1", "http_port": None}})
        try:
            rows = asyncio.run(run(f"ws://127.0.0.1:{port}", port, server.pid, Path(folder)))
        finally:
            server.terminate()
            server.wait(30)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
