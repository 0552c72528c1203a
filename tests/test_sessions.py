"""Resumable sessions: the buffer file, replay after drops with no gap or duplicate, takeover, bad ids."""
import asyncio
import json
import subprocess
import sys

import pytest
from conftest import BLOCKER, ONE_AT_A_TIME, REPO, Client, inference, text_of
from websockets.exceptions import ConnectionClosed

from llmws_server.sessions.file_buffer import simple_decrypt

LONG = inference("Tell me a long story", max_new_tokens=150, request_id="story")


@pytest.fixture(scope="module")
def reference(tiny_server):
    """The uninterrupted answer to LONG."""
    async def answer():
        client = await Client.open(tiny_server.url)
        await client.send(LONG)
        messages = await client.until("done")
        await client.close()
        return messages
    return asyncio.run(answer())


async def test_buffer_file_holds_every_stream_message_in_the_seeds_format(tiny_server):
    client = await Client.open(tiny_server.url)
    await client.send(inference(max_new_tokens=10))
    received = await client.until("done")
    await client.request({"type": "get_resources"})  # direct replies are not buffered
    lines = (tiny_server.sessions_dir / client.session_id / "buffer.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(set(entry) == {"id", "data"} for entry in entries)
    assert len({entry["id"] for entry in entries}) == len(entries)
    assert [json.loads(simple_decrypt(entry["data"])) for entry in entries] == received
    await client.close()


@pytest.mark.parametrize("drops_after", [[0], [1], [7], [40, 41, 90], [2, 20, 60, 100, 140]])
async def test_resume_after_drops_is_byte_identical(tiny_server, reference, drops_after):
    """Drop the connection after N messages (N counted from the start), resume with last_seq each time."""
    client = await Client.open(tiny_server.url)
    await client.send(LONG)
    received = []
    for drop in drops_after:
        while len(received) < drop:
            received.append(await client.recv())
        await client.ws.close()
        last_seq = received[-1]["seq"] if received else 0
        client = await Client.open(tiny_server.url, {"session_id": client.session_id, "last_seq": last_seq})
        assert client.welcome["resumed"] is True
    if not received or received[-1]["type"] != "done":
        received += await client.until("done")
    assert [m["seq"] for m in received] == [m["seq"] - reference[0]["seq"] + received[0]["seq"] for m in reference]
    assert text_of(received) == text_of(reference)
    assert text_of(received).encode() == text_of(reference).encode()
    await client.close()


async def test_resume_without_last_seq_replays_the_whole_buffer(tiny_server, reference):
    client = await Client.open(tiny_server.url)
    await client.send(LONG)
    first = await client.until("done")
    await client.close()
    again = await Client.open(tiny_server.url, {"session_id": client.session_id})
    replayed = [await again.recv() for _ in first]
    assert replayed == first
    assert text_of(replayed) == text_of(reference)
    await again.close()


async def test_queued_request_survives_its_clients_disconnect(start_server, tiny_model):
    tiny_server = start_server(tiny_model, optimization=ONE_AT_A_TIME)
    blocker = await Client.open(tiny_server.url)
    await blocker.send(BLOCKER)
    assert (await blocker.recv())["type"] == "start"
    leaver = await Client.open(tiny_server.url)
    await leaver.send(inference("Come back later", max_new_tokens=30, request_id="later"))
    queued = await leaver.recv()
    assert queued["type"] == "queued" and queued["position"] == 1
    await leaver.close()
    await blocker.send({"type": "cancel"})
    await blocker.until("done")
    await until_buffered(tiny_server, leaver.session_id, "done")  # it ran to the end with nobody connected
    back = await Client.open(tiny_server.url, {"session_id": leaver.session_id, "last_seq": queued["seq"]})
    rest = await back.until("done")
    assert rest[0]["type"] == "start" and rest[-1]["total_tokens"] == 30
    assert rest[0]["seq"] == queued["seq"] + 1
    await back.close()
    await blocker.close()


async def until_buffered(server, session_id, kind, timeout=60):
    """Wait until the session's buffer holds a message of this type."""
    buffer = server.sessions_dir / session_id / "buffer.jsonl"
    for _ in range(timeout * 10):
        if buffer.exists() and any(json.loads(simple_decrypt(json.loads(line)["data"]))["type"] == kind
                                   for line in buffer.read_text().splitlines()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {kind} in the buffer of {session_id}")


async def test_second_connection_takes_the_session_over(tiny_server):
    first = await Client.open(tiny_server.url)
    second = await Client.open(tiny_server.url, {"session_id": first.session_id})
    assert second.welcome["resumed"] is True and second.session_id == first.session_id
    with pytest.raises(ConnectionClosed) as closed:
        await first.recv(timeout=10)
    assert closed.value.rcvd.code == 4000
    assert (await second.request({"type": "ack"}))["type"] == "ack_received"
    await second.close()


@pytest.mark.parametrize("bad_id", ["../../etc", "not-a-uuid", "00000000-0000-0000-0000-000000000000",
                                    "ABCDEF00-0000-4000-8000-000000000000", 42, None, ""])
async def test_unknown_or_malformed_session_ids_get_a_fresh_session(tiny_server, bad_id):
    before = set(p.name for p in tiny_server.sessions_dir.iterdir())
    client = await Client.open(tiny_server.url, {"session_id": bad_id})
    assert client.welcome["resumed"] is False and client.session_id != bad_id
    await client.send(inference(max_new_tokens=1))
    await client.until("done")
    after = set(p.name for p in tiny_server.sessions_dir.iterdir())
    assert after - before == {client.session_id}
    assert not (tiny_server.root / "etc").exists()
    await client.close()


async def test_bad_last_seq_is_an_error_on_a_fresh_session(tiny_server):
    client = await Client.open(tiny_server.url, {"last_seq": -3})
    assert client.welcome["resumed"] is False
    assert "last_seq" in (await client.recv())["message"]
    await client.close()


def test_sessions_are_cleared_on_start(start_server, tiny_model, tmp_path_factory):
    server = start_server(tiny_model)
    # The server created var/sessions/ on start; plant a stale session and restart in the same folder.
    stale = server.sessions_dir / "11111111-1111-4111-8111-111111111111"
    stale.mkdir(parents=True)
    (stale / "buffer.jsonl").write_text("old\n")
    server.stop()
    from conftest import ServerProcess
    restarted = ServerProcess(server.root, tiny_model, {})
    try:
        assert not stale.exists() and restarted.sessions_dir.is_dir()
        for folder in ("models", "var/models", "var/sessions", "var/logs"):
            assert (server.root / folder).is_dir()
        assert "listening on" in (server.root / "var/logs/llmws.log").read_text()
        asyncio.run(told_its_session_was_cleared(restarted.url, stale.name))
    finally:
        restarted.stop()


async def told_its_session_was_cleared(url, old_id):
    client = await Client.open(url, {"session_id": old_id, "last_seq": 3})
    assert client.welcome["resumed"] is False and client.session_id != old_id
    told = await client.recv()
    assert told["type"] == "log" and "cleared when the server restarts" in told["message"]
    await client.close()


def test_a_second_server_on_the_same_port_changes_nothing(start_server, tiny_model):
    running = start_server(tiny_model)

    async def leave_an_answer():
        client = await Client.open(running.url)
        await client.send(inference("remember me", max_new_tokens=5))
        answer = await client.until("done")
        await client.close()
        return client.session_id, answer

    session_id, answer = asyncio.run(leave_an_answer())
    before = sorted(str(p.relative_to(running.root)) for p in running.root.rglob("*") if "logs" not in p.parts)
    second = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(running.root / "config.json"),
                             "--port", str(running.port)], cwd=running.root, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0
    assert second.stderr.strip() == (f"llmws: port {running.port} is in use: is another llmws running? "
                                     f"try --port {running.port + 1}")
    after = sorted(str(p.relative_to(running.root)) for p in running.root.rglob("*") if "logs" not in p.parts)
    assert after == before

    async def resume():
        client = await Client.open(running.url, {"session_id": session_id, "last_seq": 0})
        assert client.welcome["resumed"] is True
        assert await client.until("done") == answer  # the running server's clients can still resume
        await client.close()

    asyncio.run(resume())
