"""Issue #43.1: both ports obey one connection policy at accept (per address, in total), the HTTP port closes
a connection that does not send a whole request in time, refuses an impossible body unread, and a flood of
refusals is a line in the log, not a line per connection (the log's rule: tests/unit/test_listeners.py; the
admin scope off loopback: tests/unit/ws/test_handshake.py). The attackers come from 127.0.0.2 and up."""
import asyncio
import re
import resource
import socket
import time

import httpx
import pytest
from conftest import Client, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from llmws_server.listeners import RESERVED_FILES, ConnectionPolicy

PER_ADDRESS, TOTAL, DEADLINE_S = 8, 20, 2


@pytest.fixture(scope="module")
def server(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port()},
                        limits={"max_connections_per_ip": PER_ADDRESS, "max_connections": TOTAL,
                                "hello_timeout_s": DEADLINE_S})


def http_port(server) -> int:
    return server.config["server"]["http_port"]


async def open_from(address: str, port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0)) for _ in range(count)]


async def answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """The server's answer: its headers and as much body as its Content-Length says (they may come in
    separate segments), what it sent before it closed, or b"" when it says nothing within `timeout`."""
    got = b""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not _whole(got):
            piece = await asyncio.wait_for(reader.read(4096), deadline - asyncio.get_running_loop().time())
            if not piece:
                break
            got += piece
    except asyncio.TimeoutError:
        pass
    return got


def _whole(got: bytes) -> bool:
    head, found, body = got.partition(b"\r\n\r\n")
    if not found:
        return False
    length = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), b"0")
    return len(body) >= int(length)


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
        return True
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True


def close_all(connections) -> None:
    for _, writer in connections:
        writer.close()


async def polite_gets_in(server) -> None:
    """From 127.0.0.1, within 2 s: the HTTP API answers and a WebSocket session is welcomed."""
    begun = time.monotonic()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=2) as http:
        assert (await http.get("/health")).status_code == 200
    client = await asyncio.wait_for(Client.open(server.url), 2)
    await client.close()
    assert time.monotonic() - begun < 2


async def test_idle_connections_are_capped_per_address_across_both_ports_and_closed_in_time(server):
    held = await open_from("127.0.0.2", http_port(server), PER_ADDRESS)
    extra = await open_from("127.0.0.2", http_port(server), 30)
    refusals = await asyncio.gather(*(answer(reader, 5) for reader, _ in extra))
    assert all(text.startswith(b"HTTP/1.1 503") and b"limits.max_connections_per_ip" in text for text in refusals)
    with pytest.raises(InvalidStatus) as refused:  # the other port counts them too
        await connect(server.url, local_addr=("127.0.0.2", 0), open_timeout=5)
    assert refused.value.response.status_code == 503
    await polite_gets_in(server)
    begun = time.monotonic()
    assert all(await asyncio.gather(*(closed_within(reader, DEADLINE_S + 3) for reader, _ in held)))
    assert time.monotonic() - begun < DEADLINE_S + 3
    close_all(held + extra)
    output = await server.wait_for_output("refused a connection: Too many connections from 127.0.0.2")
    assert len(re.findall("refused a connection: Too many connections", output)) == 1  # 31 refusals, one line
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5,
                                 transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")) as http:
        assert (await http.get("/health")).status_code == 200  # its places came back


@pytest.mark.parametrize("sent", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # half its headers
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{",  # part of its body
])
async def test_a_request_sent_too_slowly_is_closed_at_the_deadline(server, sent):
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server), local_addr=("127.0.0.2", 0))
    writer.write(sent)
    await writer.drain()

    async def dribble() -> None:
        for _ in range(40):
            await asyncio.sleep(0.25)
            writer.write(b"x" if sent.endswith(b"{") else b"X-Slow: 1\r\n")
            await writer.drain()
    dribbling = asyncio.create_task(dribble())
    begun = time.monotonic()
    assert await closed_within(reader, DEADLINE_S + 3)
    assert time.monotonic() - begun < DEADLINE_S + 3
    dribbling.cancel()
    writer.close()


@pytest.mark.parametrize("over", [1, 99999999999])
async def test_an_impossible_content_length_is_refused_before_the_body_is_read(server, over):
    """A body declared one byte over server.max_message_size, or absurdly over, is refused unread."""
    length = server.config["server"]["max_message_size"] + over
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server), local_addr=("127.0.0.2", 0))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % length)
    await writer.drain()
    text = await answer(reader, 2)
    assert text.startswith(b"HTTP/1.1 413") and b"server.max_message_size" in text
    assert await closed_within(reader, 2)
    writer.close()


async def test_the_total_cap_counts_both_ports(server):
    first = await open_from("127.0.0.2", http_port(server), PER_ADDRESS)
    second = await open_from("127.0.0.3", server.port, PER_ADDRESS)  # WebSocket port, no handshake yet
    third = await open_from("127.0.0.4", http_port(server), PER_ADDRESS)
    answers = await asyncio.gather(*(answer(reader, 1) for reader, _ in third))
    refused = [text for text in answers if text.startswith(b"HTTP/1.1 503")]
    assert len(refused) == 2 * PER_ADDRESS + PER_ADDRESS - TOTAL and b"limits.max_connections)" in refused[0]
    close_all(first + second + third)


def test_the_open_files_limit_is_raised_to_the_hard_one_and_the_cap_logged(start_server, tiny_model):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the server inherits it
    try:
        server = start_server(tiny_model)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(line for line in open(f"/proc/{server.process.pid}/limits") if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]
    assert (f"connections: at most {min(1024, hard - RESERVED_FILES)} at once over both ports, 64 per address "
            f"(limits.max_connections, max_connections_per_ip); open-files limit {hard} (raised from 512)"
            in server.output())
    assert ConnectionPolicy.from_limits({"max_connections": 1024, "max_connections_per_ip": 64}, 300).total == 44


# -- the smaller doors: doubled headers, rebinding, CORS, idle WebSocket connections ----------------------

def raw_request(port: int, head: bytes) -> bytes:
    """A request as written, from the attacker's address; the answer's status line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer and (piece := sock.recv(4096)):
            answer += piece
    return answer


UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" \
          b"Sec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize("doubled", [b"Origin: http://localhost\r\nOrigin: http://localhost\r\n",
                                     b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
                                     b"Host: 127.0.0.1\r\nOrigin: http://localhost\r\n"])
@pytest.mark.parametrize("port_of", ["ws", "http"])
def test_a_doubled_header_is_refused_with_400(server, doubled, port_of):
    port = server.port if port_of == "ws" else http_port(server)
    upgrade = UPGRADE if port_of == "ws" else b""
    answer = raw_request(port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + upgrade + doubled + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer


@pytest.mark.parametrize("host, allowed", [("evil.example", False), ("evil.example:8000", False),
                                           ("localhost", True), ("127.0.0.1", True), ("[::1]:9", True),
                                           ("llmws.lan", True), ("app.localhost", True)])
@pytest.mark.parametrize("port_of", ["ws", "http"])
def test_a_host_that_is_not_this_servers_is_refused_against_dns_rebinding(rebinding, host, allowed, port_of):
    port = rebinding.port if port_of == "ws" else http_port(rebinding)
    path = b"/" if port_of == "ws" else b"/v1/models"
    answer = raw_request(port, b"GET " + path + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200" if allowed else b"HTTP/1.1 403"), answer


@pytest.fixture(scope="module")
def rebinding(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port(), "allowed_hosts": ["llmws.lan"]},
                        limits={"max_clients": 2, "max_clients_per_ip": 2})


@pytest.mark.parametrize("origin, allowed", [("http://localhost:3000", True), ("https://evil.example", False)])
async def test_cors_preflights_are_answered_for_allowed_origins_only(server, origin, allowed):
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == (204 if allowed else 403)
        assert preflight.headers.get("access-control-allow-origin") == (origin if allowed else None)
        if allowed:
            assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
            models = await http.get("/v1/models", headers={"Origin": origin})
            assert models.status_code == 200 and models.headers["access-control-allow-origin"] == origin


async def test_when_full_the_longest_idle_websocket_makes_room_for_a_newcomer(rebinding):
    idle = [await Client.open(rebinding.url, local_addr=("127.0.0.2", 0)) for _ in range(2)]
    newcomer = await asyncio.wait_for(Client.open(rebinding.url), 2)  # the server holds 2: one idle goes
    with pytest.raises(ConnectionClosed) as closed:
        await idle[0].recv(timeout=5)
    assert closed.value.rcvd.code == 4001 and "longest idle" in closed.value.rcvd.reason
    assert (await idle[1].request({"type": "ping"}))["type"] == "pong"
    await newcomer.close()
    await idle[1].close()
