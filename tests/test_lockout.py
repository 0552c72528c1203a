"""Issue #43: no client locks the others out. Text that is not Unicode, HTTP clients that hang up, one
client's many requests against the shared queue: each attack beside a polite client, on a real server."""
import asyncio
import json
import time

import httpx
import pytest
from conftest import BLOCKER, ONE_AT_A_TIME, Client, free_port, inference, refused_frame
from prometheus_client.parser import text_string_to_metric_families

ATTACKER = "127.0.0.2"  # loopback too, but another address than the polite client's


@pytest.fixture(scope="module")
def server(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port()})


# -- #43.6: lone surrogates ------------------------------------------------------------------------------

@pytest.mark.parametrize("frame, field", [
    ('{"type": "ping", "\\udfff": 1}', "A field name in the message"),
    ('{"type": "config", "data": {"\\ud800": 1}}', "A field name in data"),
    ('{"type": "inference", "prompt": {"user": "hi \\ud800"}}', "prompt.user is not valid Unicode"),
    ('{"type": "inference", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content is not"),
])
async def test_a_lone_surrogate_is_refused_naming_the_field_and_the_connection_stays(server, frame, field):
    reply = await refused_frame(server.url, frame)
    assert reply["message"].startswith(field), reply


async def test_a_surrogate_pair_is_text_and_is_taken(server):
    reply = await refused_frame(server.url, '{"type": "config", "data": {"seed": 1}, "\\ud83d\\ude00": 1}')
    assert "Unknown field(s) for config: \U0001F600" in reply["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages[0].content"),
    ("/v1/completions", '{"model": "m", "prompt": "\\udfff", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"model": "m", "\\udfff": 1, "messages": []}', "the message"),
])
async def test_http_refuses_a_lone_surrogate_with_400_naming_the_field(server, path, body, param):
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert "not valid Unicode" in response.json()["error"]["message"]
        polite = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert (await http.post("/v1/chat/completions", json=polite)).status_code == 200


async def test_the_server_answers_on_after_the_bad_text(server):
    client = await Client.open(server.url)
    messages = await client.until_done(inference("still here", max_new_tokens=3))
    assert messages[-1]["type"] == "done"
    await client.close()


# -- #43.4: a client that hangs up on a whole answer ------------------------------------------------------

async def metric(server, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


async def until_metric(server, name: str, above: float, timeout: float = 20, below: float = float("inf"),
                       **labels: str) -> float:
    """The metric's value once it is over `above` and under `below`, polled to a deadline."""
    deadline = time.monotonic() + timeout
    while not above < (value := await metric(server, name, **labels)) < below:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value} for {timeout} s"
        await asyncio.sleep(0.05)
    return value


async def post_raw(server, path: str, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST on a socket of its own from the attacker's address, its answer left unread."""
    port = server.config["server"]["http_port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


LONG = 3000  # tokens: far longer than the test waits
HANG_UPS = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": LONG}, 1),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": LONG,
                              "n": 2}, 2),
    ("/v1/completions", {"model": "m", "prompt": "go", "max_tokens": LONG}, 1),
    ("/v1/responses", {"model": "m", "input": "go", "store": False, "max_output_tokens": LONG}, 1),
    ("/v1/responses", {"model": "m", "input": "go", "max_output_tokens": LONG}, 1),  # stored, not background
]


@pytest.mark.parametrize("path, body, choices", HANG_UPS)
async def test_a_whole_answer_whose_client_hangs_up_is_cancelled(server, path, body, choices):
    cancelled = await metric(server, "llmws_requests_total", outcome="cancelled")
    started = await metric(server, "llmws_prompt_tokens_total")
    _, writer = await post_raw(server, path, body)
    await until_metric(server, "llmws_prompt_tokens_total", started)  # it runs
    writer.close()
    await until_metric(server, "llmws_requests_total", cancelled + choices - 1, timeout=10, outcome="cancelled")
    polite = await Client.open(server.url)
    begun = time.monotonic()
    messages = await polite.until_done(inference("polite", max_new_tokens=3))
    assert messages[-1]["type"] == "done" and time.monotonic() - begun < 10
    await polite.close()


# -- #43.2: one client against the server-wide queue ------------------------------------------------------

QUEUE_CAP = 8
HTTP_CAP = 6


@pytest.fixture(scope="module")
def one_at_a_time(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port()}, optimization=ONE_AT_A_TIME,
                        limits={"max_queued_requests": QUEUE_CAP, "max_http_requests_per_ip": HTTP_CAP})


async def first_replies(client: Client, count: int) -> list[dict]:
    """The immediate answer to each of `count` requests sent: queued (by request_id) or an error."""
    seen: dict[str, dict] = {}
    errors: list[dict] = []
    while len(seen) + len(errors) < count:
        message = await client.recv(timeout=20)
        if message["type"] == "error" and "request_id" not in message:
            errors.append(message)
        elif message["type"] == "queued":
            seen.setdefault(message["request_id"], message)
    return list(seen.values()) + errors


async def test_one_session_cannot_fill_the_queue_for_the_others(one_at_a_time):
    server = one_at_a_time
    runner = await Client.open(server.url)
    await runner.send(BLOCKER)
    await runner.until("start")
    spammer = await Client.open(server.url, local_addr=(ATTACKER, 0))
    for index in range(QUEUE_CAP + 4):
        await spammer.send(inference("spam", max_new_tokens=30, request_id=f"s{index}"))
    replies = await first_replies(spammer, QUEUE_CAP + 4)
    refused = [reply for reply in replies if reply["type"] == "error"]
    assert len(refused) == 4 and all("yours hold the most places" in r["message"] for r in refused), refused
    polite = await Client.open(server.url)
    first = await polite.request(inference("polite", max_new_tokens=3, request_id="p"))
    assert first["type"] == "queued" and first["position"] == 2, first  # the blocker and one of the spammer's
    taken = await spammer.until("error")
    assert taken[-1]["request_id"] == f"s{QUEUE_CAP - 1}" and taken[-1]["max_queued_requests"] == QUEUE_CAP
    await spammer.close()  # detached, its queued requests still count as its own
    second = await Client.open(server.url)
    assert (await second.request(inference("second", max_new_tokens=3)))["type"] == "queued"
    await runner.send({"type": "cancel", "request_id": "blocker"})
    begun = time.monotonic()
    for client in (polite, second):
        assert (await client.until("done", "error", timeout=10))[-1]["type"] == "done"
    assert time.monotonic() - begun < 10
    for client in (runner, polite, second):
        await client.close()
    await until_metric(server, "llmws_queue_depth", -1, below=1)  # the spammer's requests have all started


# -- #43.3: an HTTP client's parallel requests share one lane ---------------------------------------------

async def status_of(reader: asyncio.StreamReader) -> tuple[int, str]:
    """An HTTP answer's status and its headers' text."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
    return int(head.split()[1]), head.lower()


async def test_an_http_clients_parallel_requests_share_one_lane_and_are_capped(one_at_a_time):
    server = one_at_a_time
    runner = await Client.open(server.url)
    await runner.send(BLOCKER)
    await runner.until("start")
    waiting = await metric(server, "llmws_queue_depth")
    chat = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 5}
    attacks = [await post_raw(server, "/v1/chat/completions", chat) for _ in range(HTTP_CAP)]
    await until_metric(server, "llmws_queue_depth", waiting + HTTP_CAP - 1)
    polite = await Client.open(server.url)
    first = await polite.request(inference("polite", max_new_tokens=3))
    assert first["type"] == "queued" and first["position"] == 2, first  # the blocker and one of the client's
    reader, writer = await post_raw(server, "/v1/chat/completions", chat)  # one more at once: refused
    status, head = await status_of(reader)
    assert status == 429 and "retry-after: 1" in head and "max_http_requests_per_ip" in (await reader.read()).decode()
    writer.close()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:  # another address is not
        assert (await http.get("/v1/models")).status_code == 200
    await runner.send({"type": "cancel", "request_id": "blocker"})
    assert (await polite.until("done", "error", timeout=10))[-1]["type"] == "done"
    for reader, writer in attacks:
        assert (await status_of(reader))[0] == 200
        writer.close()
    for client in (runner, polite):
        await client.close()


async def test_a_full_queue_answers_an_http_request_429_naming_the_limit(start_server, tiny_model):
    """The fullest client (its two requests fill limits.max_queued_requests) is refused over HTTP with 429."""
    server = start_server(tiny_model, server={"http_port": free_port()}, optimization=ONE_AT_A_TIME,
                          limits={"max_queued_requests": 2})
    runner = await Client.open(server.url)
    await runner.send(BLOCKER)
    await runner.until("start")
    chat = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3}
    queued = [await post_raw(server, "/v1/chat/completions", chat) for _ in range(2)]
    await until_metric(server, "llmws_queue_depth", 1)
    reader, writer = await post_raw(server, "/v1/chat/completions", chat)
    status, _ = await status_of(reader)
    assert status == 429 and "max_queued_requests" in (await reader.read()).decode()
    writer.close()
    await runner.send({"type": "cancel", "request_id": "blocker"})
    for reader, writer in queued:
        assert (await status_of(reader))[0] == 200
        writer.close()
    await runner.close()
