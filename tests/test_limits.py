"""Limits that keep one client from hurting the others: queue caps, cheap queue positions, buffer caps,
abandoned requests, timeouts, per-address limits, fairness between sessions, session caps, file modes."""
import asyncio
import json
import stat
import subprocess
import sys

import pytest
from conftest import BLOCKER, ONE_AT_A_TIME, REPO, Client, inference
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from llmws_server.config import DEFAULTS
from llmws_server.sessions.file_buffer import simple_decrypt


def buffered_types(server, session_id) -> list[str]:
    lines = (server.sessions_dir / session_id / "buffer.jsonl").read_text().splitlines()
    return [json.loads(simple_decrypt(json.loads(line)["data"]))["type"] for line in lines]


async def closed_with(client_or_socket) -> ConnectionClosed:
    websocket = getattr(client_or_socket, "ws", client_or_socket)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(websocket.recv(), 30)
    return closed.value


async def test_many_queued_then_cancelled_requests_cost_little(start_server, tiny_model):
    server = start_server(tiny_model, limits={"max_queued_requests": 60, "queue_size_per_client": 1000},
                          optimization=ONE_AT_A_TIME)
    blocker = await Client.open(server.url)
    await blocker.send(BLOCKER)
    await blocker.until("start")
    flooder = await Client.open(server.url)
    for index in range(100):
        await flooder.send(inference(max_new_tokens=2, request_id=f"f{index}"))
    replies = [await flooder.recv() for _ in range(100)]
    assert [r["type"] for r in replies].count("queued") == 60  # the server-wide cap
    refused = [r for r in replies if r["type"] == "error"]
    assert len(refused) == 40 and all(r["message"].startswith("Server queue full (60") for r in refused)
    await asyncio.sleep(1.5)  # the rate limit's allowance comes back
    for index in range(60):
        await flooder.send({"type": "cancel", "request_id": f"f{index}"})
    replies = await flooder.until("cancelled")
    while sum(r["type"] == "cancelled" for r in replies) < 60:
        replies += await flooder.until("cancelled")
    await blocker.send({"type": "cancel"})
    await blocker.until("done")
    queued = buffered_types(server, flooder.session_id).count("queued")
    assert queued < 200, queued  # told one at a time, 60 cancels would have buffered 60 * 59 / 2 positions
    for client in (blocker, flooder):
        await client.close()


async def test_a_session_buffer_over_its_cap_refuses_new_requests_until_acked(start_server, tiny_model):
    server = start_server(tiny_model, limits={"max_session_buffer_mb": 0.01})  # 10 KB
    client = await Client.open(server.url)
    await client.send(inference(max_new_tokens=100))
    await client.until("done")
    refused = await client.request(inference(max_new_tokens=2))
    assert refused["type"] == "error" and refused["message"].startswith("Session buffer full")
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.send(inference(max_new_tokens=2))
    assert (await client.until("done"))[-1]["total_tokens"] == 2
    await client.close()


async def test_queued_requests_of_a_client_long_gone_are_cancelled(start_server, tiny_model):
    server = start_server(tiny_model, limits={"detached_queue_timeout_s": 1}, optimization=ONE_AT_A_TIME)
    blocker = await Client.open(server.url)
    await blocker.send(BLOCKER)
    await blocker.until("start")
    leaver = await Client.open(server.url)
    for request_id in ("q1", "q2"):
        assert (await leaver.request(inference(request_id=request_id)))["type"] == "queued"
    await leaver.close()
    await server.wait_for_output("cancelled 2 queued requests")
    back = await Client.open(server.url, {"session_id": leaver.session_id, "last_seq": 0})
    replayed = [await back.recv() for _ in range(4)]
    errors = [m for m in replayed if m["type"] == "error"]
    assert [m["request_id"] for m in errors] == ["q1", "q2"]
    assert all("client was gone" in m["message"] for m in errors)
    await blocker.send({"type": "cancel"})
    await blocker.until("done")
    for client in (back, blocker):
        await client.close()


@pytest.fixture(scope="module")
def impatient_server(start_server, tiny_model):
    return start_server(tiny_model, limits={"hello_timeout_s": 1, "idle_timeout_s": 2})


async def test_connections_that_never_say_hello_do_not_lock_others_out(impatient_server):
    silent = [await connect(impatient_server.url) for _ in range(DEFAULTS["limits"]["max_clients"])]
    for websocket in silent:
        assert (await closed_with(websocket)).rcvd.code == 1008
    client = await Client.open(impatient_server.url)
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.close()


async def test_an_idle_connection_is_closed_but_a_busy_one_is_not(impatient_server):
    idle = await Client.open(impatient_server.url)
    busy = await Client.open(impatient_server.url)
    await busy.send(BLOCKER)
    await busy.until("start")
    closed = await closed_with(idle)
    assert closed.rcvd.code == 1000 and closed.rcvd.reason.startswith("Idle for 2 s")
    await busy.until("token")  # still streaming after the idle one went
    await busy.send({"type": "cancel"})
    assert (await busy.until("done"))[-1]["finish_reason"] == "cancelled"
    await busy.close()


async def test_connections_per_address_are_limited(start_server, tiny_model):
    server = start_server(tiny_model, limits={"max_clients_per_ip": 2})
    first, second = await Client.open(server.url), await Client.open(server.url)
    third = await connect(server.url)
    closed = await closed_with(third)
    assert closed.rcvd.code == 1013 and "from your address" in closed.rcvd.reason
    await first.close()
    await asyncio.sleep(0.2)
    again = await Client.open(server.url)  # a freed place can be taken
    for client in (second, again):
        await client.close()


async def test_a_newcomer_waits_behind_one_request_of_each_session_not_all_of_them(start_server, tiny_model):
    server = start_server(tiny_model, optimization=ONE_AT_A_TIME)
    blocker = await Client.open(server.url)
    await blocker.send(BLOCKER)
    await blocker.until("start")
    busy = await Client.open(server.url)
    for index in range(20):
        assert (await busy.request(inference(max_new_tokens=60, request_id=f"b{index}")))["position"] == index + 1
    newcomer = await Client.open(server.url)
    assert (await newcomer.request(inference(max_new_tokens=5)))["position"] == 2  # after the blocker and b0
    await blocker.send({"type": "cancel"})
    await blocker.until("done")
    newcomer_done = asyncio.create_task(newcomer.until("done"))
    busy_starts = []
    while not newcomer_done.done():
        message = await busy.recv()
        if message["type"] == "start":
            busy_starts.append(message["request_id"])
    assert busy_starts[:1] == ["b0"] and len(busy_starts) <= 2  # b1 at most, beside the newcomer's
    for client in (blocker, busy, newcomer):
        await client.close()


async def test_sessions_are_capped_and_unused_ones_make_room(start_server, tiny_model):
    server = start_server(tiny_model, limits={"max_sessions": 3})
    for _ in range(10):  # connect and leave: each leaves an unused session that a newcomer may replace
        client = await Client.open(server.url)
        await client.close()
    held = [await Client.open(server.url) for _ in range(3)]
    refused = await connect(server.url)
    await refused.send("{}")
    closed = await closed_with(refused)
    assert closed.rcvd.code == 1013 and "too many sessions" in closed.rcvd.reason
    for client in held:
        await client.close()


async def test_buffers_and_logs_are_readable_by_the_servers_user_only(tiny_server):
    client = await Client.open(tiny_server.url)
    await client.send(inference(max_new_tokens=2))
    await client.until("done")
    session_dir = tiny_server.sessions_dir / client.session_id
    for path in (session_dir, session_dir / "buffer.jsonl", tiny_server.root / "var/logs/llmws.log"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert client.session_id not in tiny_server.output()  # the log names a prefix
    await client.close()


def test_a_download_cut_off_by_a_kill_is_cleaned_up_at_start(start_server, tiny_model):
    def populate(root):
        (root / "models" / ".download-big-abc123").mkdir(parents=True)
        (root / "models" / ".download-big-abc123" / "part.bin").write_bytes(b"x" * 1000)
    server = start_server(tiny_model, populate)
    assert not (server.root / "models" / ".download-big-abc123").exists()
    assert "removed .download-big-abc123" in server.output()


def test_the_log_rotates_at_10_mb_and_keeps_3(tmp_path):
    """The server's own logging set-up, fed 45 MB: llmws.log and three older files, each at most 10 MB."""
    script = (f"import logging, pathlib, llmws; llmws.setup_logging(pathlib.Path({str(tmp_path)!r}))\n"
              "for n in range(45 * 1024): logging.getLogger('llmws').info('x' * 1000)\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, stdout=subprocess.DEVNULL, timeout=120)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["llmws.log", "llmws.log.1", "llmws.log.2", "llmws.log.3"]
    assert all((tmp_path / name).stat().st_size <= 10 * 1024 ** 2 for name in names)
    assert (tmp_path / "llmws.log.3").stat().st_size > 9 * 1024 ** 2  # full files were rotated out, not lost early
