"""The OpenAI-compatible HTTP API, driven by the official `openai` package (and httpx for what the SDK
hides): the same model, FIFO and limits as the WebSocket, answers equal to the WebSocket's."""
import asyncio
import subprocess
import sys

import httpx
import openai
import pytest

from conftest import BLOCKER, REPO, Client, free_port, inference, text_of

PROMPT = "Tell me about rivers"
TOKEN = "http-secret"


@pytest.fixture(scope="module")
def http_server(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port()}, limits={"max_context_length": 512})


@pytest.fixture()
def api(http_server):
    return openai.AsyncOpenAI(base_url=http_server.http_url + "/v1", api_key="unused", max_retries=0)


def chat_args(max_tokens=24, **extra):
    return {"model": "any", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


async def websocket_answer(server, max_tokens=24):
    """The same request over the WebSocket: its text, tokens in and tokens out."""
    client = await Client.open(server.url)
    messages = await client.until_done(inference(PROMPT, max_new_tokens=max_tokens))
    await client.close()
    start = next(m for m in messages if m["type"] == "start")
    return text_of(messages), start["tokens_in"], messages[-1]["total_tokens"]


async def test_models_lists_the_loaded_model(api, http_server):
    models = await api.models.list()
    assert [model.id for model in models.data] == [http_server.output().split("loaded ")[1].split(" in ")[0]]


async def test_a_chat_completion_equals_the_websocket_answer(api, http_server):
    text, tokens_in, tokens_out = await websocket_answer(http_server)
    completion = await api.chat.completions.create(**chat_args())
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length"  # the tiny model has no end-of-sequence token
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (tokens_in, tokens_out)
    assert completion.usage.total_tokens == tokens_in + tokens_out
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"


async def test_a_streamed_chat_equals_the_whole_one_and_ends_with_usage(api):
    whole = await api.chat.completions.create(**chat_args())
    stream = await api.chat.completions.create(**chat_args(), stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3  # streamed in pieces, not one block
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1


async def test_a_completion_continues_the_prompt_without_the_chat_template(api):
    args = {"model": "any", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    whole = await api.completions.create(**args)
    chat = await api.chat.completions.create(**{**chat_args(16), "messages": [{"role": "user",
                                                                               "content": "Once upon a time"}]})
    assert whole.usage.prompt_tokens < chat.usage.prompt_tokens  # no template around it
    assert whole.usage.completion_tokens == 16 and whole.object == "text_completion"
    stream = await api.completions.create(**args, stream=True)
    assert "".join([chunk.choices[0].text async for chunk in stream]) == whole.choices[0].text


async def test_a_stop_string_ends_the_answer_before_it(api):
    full = (await api.chat.completions.create(**chat_args(40))).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = [c async for c in await api.chat.completions.create(**chat_args(40), stop=[stop], stream=True)]
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            choice = (await api.chat.completions.create(**chat_args(40), stop=stop)).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert (text, reason) == (expected, "stop")


@pytest.mark.parametrize("extra, param", [({"temperature": -1}, "temperature"), ({"n": 2}, "n"),
                                          ({"max_tokens": 0}, "max_tokens"), ({"top_p": 2}, "top_p"),
                                          ({"stop": [""]}, "stop"), ({"messages": []}, "messages"),
                                          ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role")])
async def test_a_bad_request_is_refused_naming_its_field(api, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**{**chat_args(), **extra})
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in refused.value.body["message"]


async def test_bad_bodies_and_too_long_prompts_get_400_with_the_figures(http_server):
    async with httpx.AsyncClient(base_url=http_server.http_url) as http:
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            response = await http.post("/v1/chat/completions", content=body)
            assert response.status_code == 400 and response.json()["error"]["message"]
        long = {**chat_args(), "messages": [{"role": "user", "content": "river " * 600}]}
        response = await http.post("/v1/chat/completions", json=long)
        error = response.json()["error"]
        assert response.status_code == 400 and error["max_context"] == 512 and error["input_length"] > 512
        assert "Context too long" in error["message"]
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_a_request_that_waits_is_told_its_place_and_shares_the_fifo(api, http_server):
    client = await Client.open(http_server.url)
    await client.send(BLOCKER)
    await client.until("start")
    response = await api.chat.completions.with_raw_response.create(**chat_args(4))
    assert response.headers["x-llmws-queue-position"] == "1"
    assert response.parse().usage.completion_tokens == 4
    await client.send({"type": "cancel", "request_id": "blocker"})
    await client.until("done")
    await client.close()


async def test_a_client_that_leaves_mid_stream_cancels_its_request(api, http_server):
    stream = await api.chat.completions.create(**chat_args(4000), stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await http_server.wait_for_output("cancelled: its HTTP client left")
    client = await Client.open(http_server.url)
    messages = await client.until_done(inference(PROMPT, max_new_tokens=4))
    assert messages[-1]["type"] == "done" and messages[-1]["total_tokens"] == 4
    await client.close()


async def test_the_token_and_the_origin_are_checked(start_server, tiny_model):
    server = start_server(tiny_model, server={"http_port": free_port(), "auth_token": TOKEN})
    refused = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await refused.models.list()
    allowed = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=TOKEN, max_retries=0)
    assert (await allowed.chat.completions.create(**chat_args(4))).usage.completion_tokens == 4
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        foreign = await http.get("/v1/models", headers={"Origin": "https://evil.example",
                                                        "Authorization": f"Bearer {TOKEN}"})
        assert foreign.status_code == 403
        assert (await http.get("/health")).status_code == 200  # liveness needs no token
    await asyncio.sleep(0)


def test_a_taken_http_port_stops_the_start_with_one_line(http_server):
    port = http_server.config["server"]["http_port"]
    second = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(http_server.root / "config.json"),
                             "--port", str(free_port()), "--http-port", str(port)], cwd=http_server.root,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert second.stderr.strip() == (f"llmws: port {port} is in use: is another llmws running? try --http-port "
                                     f"{port + 1} (or --http-port 0 for no HTTP API)")
