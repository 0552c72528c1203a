"""Hostile clients: oversize and nested frames, floods, slow readers, a failing disk, take-over races, and
property-based fuzzing. The server must answer each with a well-formed message, stay up, and write nothing
outside its folders."""
import asyncio
import base64
import itertools
import json
import os
import re
import socket
import struct
import time
import uuid

import pytest
from conftest import Client, inference, text_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as connect_sync

FRAME_LIMIT = 65536


@pytest.fixture(scope="module")
def hostile_server(start_server, tiny_model, tmp_path_factory):
    return start_server(tiny_model, server={"max_message_size": FRAME_LIMIT},
                        limits={"timeout_token_generation": 15, "max_clients_per_ip": 10},
                        download={"allowed_url_prefixes": ["file:///nonexistent-llmws-test/"]})


def files_outside(root):
    """Everything in the project folder except sessions and logs, which the server writes as it runs."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not {"sessions", "logs"} & set(p.parts)}


async def test_a_frame_over_max_message_size_is_closed_with_1009(hostile_server):
    client = await Client.open(hostile_server.url)
    await client.send({"type": "config", "data": {"x": "a" * FRAME_LIMIT}})
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv(timeout=10)
    assert closed.value.sent.code == 1009 or closed.value.rcvd.code == 1009


@pytest.mark.parametrize("frame", ["[" * 100000 + "]" * 100000, '{"a":' * 5000 + "1" + "}" * 5000,
                                   json.dumps({"type": "config",
                                               "data": {"x": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}})])
async def test_deeply_nested_json_is_refused(hostile_server, frame):
    if len(frame) > FRAME_LIMIT:
        frame = frame[:FRAME_LIMIT // 2] + frame[-FRAME_LIMIT // 2:]
    client = await Client.open(hostile_server.url)
    await client.ws.send(frame)
    assert "nested too deeply" in (await client.recv())["message"]
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.close()


async def test_a_flood_gets_errors_not_unbounded_work(hostile_server):
    client = await Client.open(hostile_server.url)
    for _ in range(400):
        await client.send({"type": "ack"})
    replies = [await client.recv() for _ in range(400)]
    refused = [r for r in replies if r["type"] == "error"]
    assert refused and all("Too many messages" in r["message"] for r in refused)
    assert len(refused) + len([r for r in replies if r["type"] == "ack_received"]) == 400
    await asyncio.sleep(2.5)  # the allowance comes back
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.close()


async def test_prompt_too_long_is_refused_before_tokenizing_with_the_context_fields(hostile_server):
    client = await Client.open(hostile_server.url)
    reply = await client.request(inference("x" * 40000))
    assert reply["type"] == "error" and reply["message"].startswith("Context too long (at least 5000 tokens")
    assert reply["max_context"] == client.welcome["capabilities"]["max_context"]
    assert reply["input_length"] == 5000 and reply["input_length_estimated"] is True
    assert reply["input_length"] >= reply["max_context"]
    await client.close()


async def test_the_character_estimate_refuses_only_past_8_characters_a_token(hostile_server):
    client = await Client.open(hostile_server.url)
    most = 8 * client.welcome["capabilities"]["max_context"]
    over = await client.request(inference("x" * (most + 1), max_new_tokens=1))
    assert over["type"] == "error" and over["input_length_estimated"] is True
    assert over["input_length"] == (most + 1) // 8
    await client.send(inference("x" * most, max_new_tokens=1))  # tokenized: answered, or refused by its real count
    last = (await client.until("done", "error"))[-1]
    assert last["type"] == "done" or (last["message"].startswith("Context too long (")
                                      and "input_length_estimated" not in last)
    await client.close()


@pytest.fixture(scope="module")
def roomy_server(start_server, tiny_model):
    """The default max_message_size: the largest frames a client may send."""
    return start_server(tiny_model)


async def answers_while(server, hostile_frames, seconds=3.0):
    """Send each hostile frame from its own client and check that a bystander's ack is answered within
    `seconds` meanwhile (the event loop did not stall); return each hostile client's reply."""
    bystander = await Client.open(server.url)
    hostiles = [await Client.open(server.url) for _ in hostile_frames]
    for client, frame in zip(hostiles, hostile_frames):
        await client.ws.send(frame)
    await asyncio.sleep(0.2)  # the frames are in
    reply = await bystander.request({"type": "ack"}, timeout=seconds)
    assert reply["type"] == "ack_received"
    replies = [await client.recv(timeout=60) for client in hostiles]
    for client in [bystander, *hostiles]:  # every connection stays open and usable
        assert (await client.request({"type": "ack"}))["type"] == "ack_received"
        await client.close()
    return replies


async def test_a_flood_of_legacy_tags_is_parsed_in_linear_time(roomy_server):
    frame = json.dumps({"type": "inference", "prompt": "<|user|>" * (256 * 1024 // 8)})
    replies = await answers_while(roomy_server, [frame, frame])
    assert all(r["type"] == "error" and r["message"].startswith("Context too long") for r in replies)


async def test_frames_full_of_tiny_arrays_are_refused_without_stalling(roomy_server):
    frame = "[" + ",".join(["[]"] * (4 * 1024 * 1024 // 3 - 1)) + "]"
    replies = await answers_while(roomy_server, [frame] * 3)
    assert all(r["type"] == "error" and "Too many JSON values" in r["message"] for r in replies)


@pytest.mark.parametrize("frame, problem", [
    ("1" * 5001, "Invalid JSON"),
    ('{"type": "config", "data": {"temperature": 1%s}}' % ("0" * 400), "temperature must be a number"),
    ('{"type": "config", "data": {"top_k": 1e400}}', "top_k must be a number"),
    ('{"type": "inference", "messages": [{"role": [], "content": "x"}]}', "role must be one of"),
    ('{"type": "inference", "messages": [{"role": {}, "content": "x"}]}', "role must be one of"),
    ('{"type": "%s"}' % ("x" * 1000000), "Unknown message type"),
])
async def test_malformed_frames_get_an_error_and_the_connection_stays_open(roomy_server, frame, problem):
    client = await Client.open(roomy_server.url)
    await client.ws.send(frame)
    reply = await client.recv()
    assert reply["type"] == "error" and problem in reply["message"], reply
    assert len(reply["message"]) < 500  # nothing echoed back at length
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.close()


def masked_frame(text: str) -> bytes:
    """One client-to-server WebSocket text frame, written by hand (RFC 6455 section 5.2)."""
    payload, mask = text.encode(), os.urandom(4)
    length = (bytes([0x80 | len(payload)]) if len(payload) < 126
              else bytes([0x80 | 126]) + struct.pack("!H", len(payload)))
    return bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_non_reader(port: int, frames: list[dict]) -> tuple[socket.socket, str]:
    """A client that handshakes, reads its welcome, sends its frames and never reads another byte (a small
    receive window too). Returns the socket and its session id."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    sock.sendall(masked_frame(json.dumps({})))
    received = b""
    while not (found := re.search(rb'"session_id": "([0-9a-f-]{36})"', received)):
        received += sock.recv(4096)
    for message in frames:
        sock.sendall(masked_frame(json.dumps(message)))
    return sock, found.group(1).decode()


async def test_a_client_that_never_reads_is_let_go_without_stalling_others(start_server, tiny_model):
    # The floods must outgrow the kernel's buffers and the outbox however slowly a busy machine generates:
    # no generation timeout cuts them short here, and the drop is awaited as long as they may take.
    server = start_server(tiny_model, server={"max_message_size": FRAME_LIMIT}, limits={"max_clients_per_ip": 10})
    floods = [inference("flood me", max_new_tokens=3000, request_id=f"flood{index}") for index in range(2)]
    slow, session_id = await asyncio.to_thread(open_non_reader, server.port, floods)
    other = await Client.open(server.url)
    await other.send(inference("meanwhile", max_new_tokens=5))
    assert (await other.until("done", timeout=60))[-1]["total_tokens"] == 5  # the worker did not stall
    out = await server.wait_for_output("dropping a client that does not read", timeout=240)
    assert session_id not in out and f"session {session_id[:8]} opened" in out  # the log names a prefix only
    slow.close()
    back = await Client.open(server.url, {"session_id": session_id, "last_seq": 0})
    assert back.welcome["resumed"] is True
    replayed = await back.until("done")
    replayed += await back.until("done")
    assert [m["request_id"] for m in replayed if m["type"] == "done"] == ["flood0", "flood1"]  # nothing lost
    assert [m["seq"] for m in replayed] == list(range(1, len(replayed) + 1))
    await back.close()
    await other.close()


async def test_a_failing_buffer_write_is_reported_and_the_answer_still_arrives(hostile_server):
    client = await Client.open(hostile_server.url)
    blocked = hostile_server.sessions_dir / client.session_id / "buffer.jsonl"
    blocked.mkdir(parents=True)  # a directory where the file should go: every write fails, as on a full disk
    await client.send(inference("write me", max_new_tokens=8))
    messages = await client.until("done")
    problems = [m for m in messages if m["type"] == "error"]
    assert len(problems) == 1 and "Cannot write the session buffer" in problems[0]["message"]
    assert messages[-1]["total_tokens"] == 8 and text_of(messages)
    blocked.rmdir()
    await client.send(inference("write me", max_new_tokens=3))
    await client.until("done")
    assert blocked.is_file()  # buffering works again
    await client.close()


async def test_a_take_over_race_leaves_exactly_one_connection(hostile_server):
    first = await Client.open(hostile_server.url)
    hello = {"session_id": first.session_id}
    racers = await asyncio.gather(*(Client.open(hostile_server.url, hello) for _ in range(8)))
    await asyncio.sleep(1)
    alive = []
    for client in [first, *racers]:
        try:
            reply = await client.request({"type": "ack"})
            alive.append(reply["type"] == "ack_received")
        except ConnectionClosed as closed:
            assert closed.rcvd.code == 4000
    assert alive == [True]
    assert all(client.session_id == first.session_id for client in racers)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3),
                           max_leaves=8)
messages = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["inference", "config", "ack", "cancel", "get_resources", "list_models", "switch_model",
                             "download_model", "delete_model", "bogus"]) | st.text(max_size=5),
    "prompt": st.text(max_size=30) | st.dictionaries(st.sampled_from(["user", "system", "x"]), st.text(max_size=10)),
    "messages": st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                         st.sampled_from(["user", "assistant", "wizard"]) | json_values),
                         max_size=3),
    "config": st.dictionaries(st.sampled_from(["temperature", "top_k", "top_p", "max_new_tokens", "beam"]),
                              st.integers(-5, 3) | st.floats(allow_nan=False) | st.text(max_size=3)),
    "data": st.dictionaries(st.sampled_from(["temperature", "max_new_tokens", "zzz"]), st.integers(-2, 2)),
    "request_id": st.text(max_size=12),
    "model_path": st.sampled_from(["../../etc", "/etc", "models/x", "var/models/../..", "", "a\x00b"]) | st.text(),
    "model_name": st.sampled_from(["..", ".", "../x", "x/y", "\x01"]) | st.text(max_size=10),
    "repo": st.sampled_from(["-oProxyCommand=x", "ext::sh -c id", "file:///etc", "https://a@b/c"]) | st.text(),
    "target_dir": st.sampled_from(["..", "../x", "/tmp", ".git"]) | st.text(max_size=10),
    "session_id": st.text(max_size=40),
    "last_seq": json_values,
})
messages = messages | st.dictionaries(st.sampled_from(["type", "prompt", "messages", "config", "data", "request_id",
                                                      "model_path", "model_name", "repo", "target_dir"]),
                                      json_values, max_size=4)  # every field with a value of any JSON type


@pytest.fixture(scope="module")
def fuzz_connections(hostile_server):
    """Several connections taken in turn, so the fuzzing stays under each one's rate limit."""
    connections = []
    for _ in range(6):  # of max_clients 10
        websocket = connect_sync(hostile_server.url)
        websocket.send(json.dumps({}))
        json.loads(websocket.recv())
        websocket.send(json.dumps({"type": "config", "data": {"max_new_tokens": 2}}))
        json.loads(websocket.recv())
        connections.append(websocket)
    yield itertools.cycle(connections)
    for websocket in connections:
        websocket.close()


def send_marker(websocket) -> str:
    """A cancel of a request that never was: answered with an error that names it."""
    marker = f"marker-{uuid.uuid4()}"
    websocket.send(json.dumps({"type": "cancel", "request_id": marker}))
    return marker


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=messages)
def test_fuzzed_messages_get_well_formed_answers(hostile_server, fuzz_connections, message):
    before = files_outside(hostile_server.root)
    websocket = next(fuzz_connections)
    websocket.send(json.dumps(message))
    markers = {send_marker(websocket)}  # its answer comes after everything the fuzzed message caused
    while True:
        reply = json.loads(websocket.recv(timeout=30))
        assert isinstance(reply, dict) and isinstance(reply.get("type"), str)
        if reply["type"] != "error":
            continue
        assert isinstance(reply["message"], str) and reply["message"]
        if any(marker in reply["message"] for marker in markers):
            break
        if reply["message"].startswith("Too many messages"):  # the rate limit at work: slow down, mark again
            time.sleep(0.1)
            markers.add(send_marker(websocket))
    assert files_outside(hostile_server.root) == before


async def test_the_server_is_still_well_after_all_that(hostile_server):
    client = await Client.open(hostile_server.url)
    await client.send(inference("still there?", max_new_tokens=4))
    assert (await client.until("done"))[-1]["total_tokens"] == 4
    assert hostile_server.process.poll() is None
    await client.close()
