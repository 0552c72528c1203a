"""Issue #41: no answer lost on the HTTP side. A streamed chat completion or completion numbers its events
(`id: <answer id>/<n>`), and a client that drops comes back with Last-Event-ID, on the POST again or on
GET .../{answer id}/events, for exactly the rest: no gap, no duplicate. A stream nobody comes back to is
cancelled after limits.stream_resume_s. Real server, tiny model, raw SSE read with httpx."""
import asyncio
import json
import os
import shutil
import threading

import httpx
import openai
import pytest
from conftest import free_port

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def server(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port(), "auth_token": "secret"},
                        limits={"stream_resume_s": 30})


@pytest.fixture()
async def http(server):
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60,
                                 headers={"Authorization": "Bearer secret"}) as client:
        yield client


def chat_body(max_tokens=24, **extra):
    return {"model": "any", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}


async def sse_events(response: httpx.Response, most: int | None = None) -> list[dict]:
    """The data events of an SSE response as {"id", "data"} (comments and retry skipped), stopping after
    `most` of them (the client then drops the connection)."""
    events, event = [], {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in event:
                events.append(event)
                if most is not None and len(events) == most:
                    return events
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            if field in ("id", "data"):
                event[field] = value.removeprefix(" ")
    return events


async def stream_events(http: httpx.AsyncClient, path: str, body: dict | None = None, most: int | None = None,
                        **headers) -> list[dict]:
    method = "POST" if body is not None else "GET"
    async with http.stream(method, path, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        return await sse_events(response, most)


def text_of(events: list[dict], field="content") -> str:
    text = ""
    for event in events:
        if event["data"] != "[DONE]":
            for choice in json.loads(event["data"]).get("choices", []):
                text += (choice.get("delta", {}).get(field) or "") if field == "content" else choice.get("text", "")
    return text


def numbers(events: list[dict]) -> list[int]:
    return [int(event["id"].rpartition("/")[2]) for event in events]


async def test_every_event_is_numbered_in_order_under_the_answers_id(http):
    events = await stream_events(http, "/v1/chat/completions", chat_body(8))
    answer_id = json.loads(events[0]["data"])["id"]
    assert answer_id.startswith("chatcmpl-")
    assert [event["id"].rpartition("/")[0] for event in events] == [answer_id] * len(events)
    assert numbers(events) == list(range(1, len(events) + 1)) and events[-1]["data"] == "[DONE]"


async def test_a_dropped_stream_resumed_on_the_post_gives_exactly_the_rest(http, server):
    whole = await stream_events(http, "/v1/chat/completions", chat_body(24))
    first = await stream_events(http, "/v1/chat/completions", chat_body(24), most=5)
    rest = await stream_events(http, "/v1/chat/completions", chat_body(24), **{"Last-Event-ID": first[-1]["id"]})
    assert numbers(rest)[0] == numbers(first)[-1] + 1  # no gap, no duplicate
    assert numbers(first + rest) == list(range(1, len(first + rest) + 1))
    assert text_of(first + rest) == text_of(whole) and rest[-1]["data"] == "[DONE]"
    sdk = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="secret", max_retries=0)
    answer = await sdk.chat.completions.create(**{**chat_body(24), "stream": False})
    assert answer.choices[0].message.content == text_of(whole)  # the same answer the SDK gets whole


async def test_a_finished_stream_is_read_again_by_get_after_any_event(http):
    events = await stream_events(http, "/v1/chat/completions", chat_body(12))
    answer_id = json.loads(events[0]["data"])["id"]
    path = f"/v1/chat/completions/{answer_id}/events"
    assert await stream_events(http, path) == events
    assert await stream_events(http, path + "?after=3") == events[3:]
    assert await stream_events(http, path, **{"Last-Event-ID": events[5]["id"]}) == events[6:]


async def test_a_completion_stream_resumes_and_its_id_is_not_a_chat_streams(http):
    body = {"model": "any", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    whole = await stream_events(http, "/v1/completions", body)
    first = await stream_events(http, "/v1/completions", body, most=4)
    answer_id = first[0]["id"].rpartition("/")[0]
    assert answer_id.startswith("cmpl-")
    rest = await stream_events(http, f"/v1/completions/{answer_id}/events", **{"Last-Event-ID": first[-1]["id"]})
    assert text_of(first + rest, "text") == text_of(whole, "text") and numbers(rest)[0] == 5
    wrong_kind = await http.get(f"/v1/chat/completions/{answer_id}/events")
    assert wrong_kind.status_code == 404 and wrong_kind.json()["error"]["type"] == "not_found_error"


async def test_two_choices_resume_in_the_order_they_were_sent(http):
    whole = await stream_events(http, "/v1/chat/completions", chat_body(10, n=2))
    first = await stream_events(http, "/v1/chat/completions", chat_body(10, n=2), most=7)
    rest = await stream_events(http, f"/v1/chat/completions/{first[0]['id'].rpartition('/')[0]}/events",
                               **{"Last-Event-ID": first[-1]["id"]})
    def by_choice(events):
        texts = {0: "", 1: ""}
        for event in events[:-1]:
            for choice in json.loads(event["data"])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
        return texts
    assert by_choice(first + rest) == by_choice(whole) and numbers(rest)[0] == 8


async def test_bad_and_unknown_event_ids_are_refused_and_change_nothing(http):
    bad = await http.post("/v1/chat/completions", json=chat_body(), headers={"Last-Event-ID": "not-an-id"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    unknown = await http.post("/v1/chat/completions", json=chat_body(),
                              headers={"Last-Event-ID": "chatcmpl-" + "0" * 32 + "/3"})
    assert unknown.status_code == 404 and "No stream found" in unknown.json()["error"]["message"]
    after = await http.get("/v1/chat/completions/chatcmpl-x/events?after=-1")
    assert after.status_code == 400 and after.json()["error"]["param"] == "after"
    assert text_of(await stream_events(http, "/v1/chat/completions", chat_body(4)))  # still served


async def test_reading_a_stream_again_needs_the_token(http, server):
    events = await stream_events(http, "/v1/chat/completions", chat_body(4))
    answer_id = events[0]["id"].rpartition("/")[0]
    async with httpx.AsyncClient(base_url=server.http_url) as anonymous:
        refused = await anonymous.get(f"/v1/chat/completions/{answer_id}/events")
        assert refused.status_code == 401
        refused = await anonymous.post("/v1/chat/completions", json=chat_body(),
                                       headers={"Last-Event-ID": events[0]["id"]})
        assert refused.status_code == 401


async def test_a_stream_nobody_comes_back_to_is_cancelled_and_says_so(start_server, tiny_model):
    quick = start_server(tiny_model, server={"http_port": free_port()}, limits={"stream_resume_s": 1})
    async with httpx.AsyncClient(base_url=quick.http_url, timeout=60) as http:
        first = await stream_events(http, "/v1/chat/completions", chat_body(4000), most=3)
        await quick.wait_for_output("cancelled: no client read it for 1 s")
        await quick.wait_for_output("cancelled: its HTTP client left")  # its job ended
        rest = await stream_events(http, "/v1/chat/completions", chat_body(),
                                   **{"Last-Event-ID": first[-1]["id"]})
        assert "limits.stream_resume_s" in json.loads(rest[-2]["data"])["error"]["message"]
        assert rest[-1]["data"] == "[DONE]" and numbers(rest)[0] == 4


class CuttingProxy:
    """A TCP proxy on loopback to `port` that cuts its first connection right after `events` SSE events went
    through, as a network that drops would, and keeps the head of each request it passes."""

    def __init__(self, port: int, events: int):
        self.target, self.events = port, events
        self.heads: list[bytes] = []
        self.handlers: set[asyncio.Task] = set()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop)
        self.server = started.result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        self.handlers.add(asyncio.current_task())
        cut = self.events if not self.heads else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        up_writer.write(head)
        try:
            while data := await up_reader.read(65536):
                if cut is not None and data.count(b"data: ") >= cut:  # forward up to the cut's event, no more
                    at = -1
                    for _ in range(cut):
                        at = data.index(b"data: ", at + 1)
                    writer.write(data[:data.index(b"\r\n\r\n", at) + 4])  # its line and the blank line
                    await writer.drain()
                    return
                cut = None if cut is None else cut - data.count(b"data: ")
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            up_writer.close()

    def close(self):
        async def stop():
            self.server.close()
            for handler in self.handlers:
                handler.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


COLLECT = """async (url) => await new Promise((resolve, reject) => {
    const events = [], source = new EventSource(url);
    source.onmessage = (event) => {
        events.push({id: event.lastEventId, data: event.data});
        if (event.data === "[DONE]") { source.close(); resolve(events); }
    };
    setTimeout(() => { source.close(); reject(new Error("no [DONE]: " + JSON.stringify(events))); }, 60000);
})"""


@pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed")
def test_a_browsers_event_source_cut_off_resumes_by_itself_with_no_gap(start_server, tiny_model):
    from playwright.sync_api import sync_playwright
    http_port = free_port()
    server = start_server(tiny_model, server={"http_port": http_port}, limits={"stream_resume_s": 30})
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(48)) as response:
            answer_id = json.loads(next(line for line in response.iter_lines() if line.startswith("data:"))[5:])["id"]
        proxy = CuttingProxy(http_port, 3)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_context(bypass_csp=True).new_page()
                page.goto(f"http://127.0.0.1:{server.port}/")  # a page of an allowed origin
                seen = page.evaluate(COLLECT, f"http://127.0.0.1:{proxy.port}/v1/chat/completions/{answer_id}/events")
                browser.close()
        finally:
            proxy.close()
    events = asyncio.run(_all_events(server, answer_id))  # every event, read again whole
    assert len(proxy.heads) == 2 and f"last-event-id: {answer_id}/3".encode() in proxy.heads[1].lower()
    assert seen == events and numbers(seen) == list(range(1, len(seen) + 1))


async def _all_events(server, answer_id: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
        return await stream_events(http, f"/v1/chat/completions/{answer_id}/events")
