"""One FIFO for all clients: order, queue positions, per-client and client-count limits, the time limit."""
import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from conftest import BLOCKER, ONE_AT_A_TIME, Client, free_port, inference
from websockets.exceptions import ConnectionClosed


@pytest.fixture(scope="module")
def limited_server(start_server, tiny_model):
    """The one-at-a-time worker (max_batch_size 1); test_batching has the batching one's order."""
    return start_server(tiny_model, limits={"max_clients": 5, "queue_size_per_client": 2},
                        optimization={"max_batch_size": 1})


async def test_three_clients_are_served_in_arrival_order(limited_server):
    blocker = await Client.open(limited_server.url)
    await blocker.send(BLOCKER)
    assert (await blocker.recv())["type"] == "start"
    clients = [await Client.open(limited_server.url) for _ in range(3)]
    for position, client in enumerate(clients, start=1):
        # each runs for longer than POSITION_UPDATE_S, so every change of position is told
        await client.send(inference(f"client {position}", max_new_tokens=300))
        queued = await client.recv()
        assert queued["type"] == "queued" and queued["position"] == position
    await blocker.send({"type": "cancel"})
    await blocker.until("done")

    order = []

    async def follow(index, client):
        for message in await client.until("done"):
            order.append((message["type"], index, message.get("position")))

    await asyncio.gather(*(follow(index, client) for index, client in enumerate(clients)))
    starts_and_dones = [(kind, index) for kind, index, _ in order if kind in ("start", "done")]
    assert starts_and_dones == [("start", 0), ("done", 0), ("start", 1), ("done", 1), ("start", 2), ("done", 2)]
    # positions were updated as the queue moved: client 2 went 2 -> 1, client 3 went 3 -> 2 -> 1
    updates = {index: [position for kind, i, position in order if kind == "queued" and i == index]
               for index in range(3)}
    assert updates == {0: [], 1: [1], 2: [2, 1]}
    for client in clients + [blocker]:
        await client.close()


async def sse_items(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """An SSE stream as it comes: ("comment", text) for each comment line, ("data", data) for each event with
    data (its data lines joined); other fields (id, retry, event) are read past."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "data", "\n".join(data)
            data = []
        elif line.startswith(":"):
            yield "comment", line[1:].removeprefix(" ")
        else:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
    if data:
        yield "data", "\n".join(data)


async def test_a_streamed_chat_completion_that_waits_is_told_its_place_in_an_sse_comment(start_server, tiny_model):
    """A streamed chat completion that must wait gets the SSE comment `queued: N ahead` (N: the requests ahead
    of it) before its first token, then its whole answer."""
    server = start_server(tiny_model, server={"http_port": free_port()}, optimization=ONE_AT_A_TIME)
    blocker = await Client.open(server.url)
    await blocker.send(BLOCKER)
    await blocker.until("start")
    body = {"model": "any", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200 and response.headers["x-llmws-queue-position"] == "1"
            await blocker.send({"type": "cancel", "request_id": "blocker"})
            items = [item async for item in sse_items(response)]
    assert ("comment", "queued: 1 ahead") in items, items
    chunks = [json.loads(data) for kind, data in items if kind == "data" and data != "[DONE]"]
    first_text = next(index for index, (kind, data) in enumerate(items) if kind == "data" and data != "[DONE]"
                      and json.loads(data)["choices"][0]["delta"].get("content"))
    assert items.index(("comment", "queued: 1 ahead")) < first_text
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert items[-1] == ("data", "[DONE]")
    await blocker.until("done")
    await blocker.close()


async def test_a_waiting_requests_positions_come_at_most_every_quarter_second(start_server, tiny_model):
    """The queue ahead of a request moves faster than a place per 0.25 s (32-token requests): its new
    positions come at least 0.25 s apart (less 50 ms for their way over loopback: the messages carry no
    server time), the changes in between coalesced into one, and they only fall."""
    server = start_server(tiny_model, optimization=ONE_AT_A_TIME)
    blocker = await Client.open(server.url)
    await blocker.send(BLOCKER)
    await blocker.until("start")
    client = await Client.open(server.url)
    ahead = 24
    for index in range(ahead):  # one session's requests: first come first served, all ahead of the last
        await client.send(inference(f"short {index}", max_new_tokens=32, request_id=f"short-{index}"))
    await client.send(inference("last", max_new_tokens=1, request_id="last"))
    loop = asyncio.get_running_loop()
    told: list[tuple[float, int]] = []  # (arrival time, position) of each queued message of the last request
    while not told:
        message = await client.recv()
        if message["type"] == "queued" and message["request_id"] == "last":
            told.append((loop.time(), message["position"]))
    assert told[0][1] == ahead + 1  # the running blocker and the short ones
    await blocker.send({"type": "cancel", "request_id": "blocker"})
    while (message := await client.recv())["type"] != "done" or message["request_id"] != "last":
        if message["type"] == "queued" and message["request_id"] == "last":
            told.append((loop.time(), message["position"]))
    positions = [position for _, position in told]
    assert positions == sorted(set(positions), reverse=True), positions  # each new, and falling
    updates = told[1:]  # the first is the answer to the frame; the updates are the ones paced
    assert len(updates) >= 2, positions
    gaps = [later - earlier for (earlier, _), (later, _) in zip(updates, updates[1:])]
    assert min(gaps) >= 0.2, (gaps, positions)
    assert any(earlier - later > 1 for earlier, later in zip(positions, positions[1:])), positions  # coalesced
    await blocker.close()
    await client.close()


async def test_per_client_queue_limit_refuses_with_queue_full(limited_server):
    client = await Client.open(limited_server.url)  # its own blocker streams tokens meanwhile: skip them
    await client.send(BLOCKER)
    await client.until("start")
    await client.send(inference(max_new_tokens=2, request_id="second"))
    assert (await client.until("queued"))[-1]["request_id"] == "second"
    await client.send(inference(max_new_tokens=2, request_id="third"))
    assert (await client.until("error"))[-1] == {"type": "error", "message": "Queue full"}
    other = await Client.open(limited_server.url)  # the limit is per client
    await other.send(inference(max_new_tokens=2))
    assert (await other.recv())["type"] == "queued"
    await client.send({"type": "cancel", "request_id": "second"})
    assert (await client.until("cancelled"))[-1] == {"type": "cancelled", "request_id": "second"}
    await client.send({"type": "cancel", "request_id": "blocker"})
    received = await client.until("done")
    assert received[-1]["request_id"] == "blocker" and received[-1]["finish_reason"] == "cancelled"
    assert (await other.until("done"))[-1]["total_tokens"] == 2
    assert not [m for m in received if m.get("request_id") == "second" and m["type"] == "start"]
    await client.close()
    await other.close()


async def open_when_room(url, timeout=30) -> Client:
    """A client, once the server has a place (it may still be closing connections that just left)."""
    for _ in range(timeout * 10):
        try:
            return await Client.open(url)
        except ConnectionClosed as closed:
            assert closed.rcvd.code == 1013
            await asyncio.sleep(0.1)
    raise AssertionError("no place came free")


async def test_client_beyond_max_clients_is_closed_with_1013(limited_server):
    clients = [await open_when_room(limited_server.url) for _ in range(5)]
    for client in clients:  # each with a request queued or running: none is closed to make room
        assert (await client.request(inference("busy", max_new_tokens=4000, request_id="busy")))["type"] in (
            "start", "queued")
    with pytest.raises(ConnectionClosed) as closed:
        await Client.open(limited_server.url)
    assert closed.value.rcvd.code == 1013 and "too many clients" in closed.value.rcvd.reason
    for client in clients:
        await client.send({"type": "cancel", "request_id": "busy"})
        await client.until("cancelled")
    await clients[0].close()
    replacement = await open_when_room(limited_server.url)  # a freed place can be taken again
    for client in clients[1:] + [replacement]:
        await client.close()


async def test_runaway_generation_stops_at_the_time_limit(start_server, tiny_model):
    server = start_server(tiny_model, limits={"timeout_token_generation": 0.5})
    client = await Client.open(server.url)
    await client.send(BLOCKER)
    done = (await client.until("done"))[-1]
    assert done["finish_reason"] == "timeout" and 0 < done["total_tokens"] < 4000
    await client.send(inference(max_new_tokens=3))
    assert (await client.until("done"))[-1]["finish_reason"] == "length"  # the worker carries on
    await client.close()


async def test_sigterm_closes_clients_with_1001_and_exits_0(start_server, tiny_model):
    server = start_server(tiny_model)
    client = await Client.open(server.url)
    await client.send(BLOCKER)
    await client.until("start")
    server.process.terminate()
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.recv(timeout=20)
    assert closed.value.rcvd.code == 1001
    assert await asyncio.to_thread(server.process.wait, 20) == 0
    assert "shutting down" in server.output()
