"""The Anthropic Messages API, driven by the official `anthropic` package (and httpx for the raw event
stream): on the default model under transformers and, from its GGUF, under llama.cpp; refusals, the token
and a client that leaves on the tiny random model."""
import base64
import json

import anthropic
import httpx
import jsonschema
import pytest
from conftest import ENGINES, ONE_AT_A_TIME, engine_server, free_port
from prometheus_client.parser import text_string_to_metric_families

CONFIG = {"limits": {"max_context_length": 2048}}
TOKEN = "anthropic-secret"
CONTEXT = 512  # the guarded server's max_context_length
TOO_LONG = "river " * 600  # over CONTEXT tokens, under the characters refused unread (8 a token)
QUESTION = "What is the weather in Paris?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIMEZONE = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER},
         {"name": "get_time", "description": "The time in a timezone", "input_schema": TIMEZONE}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIMEZONE}


@pytest.fixture(scope="module", params=ENGINES)
def server(request, start_server, default_model):
    """The default model on each engine, sharing the module."""
    return engine_server(start_server, default_model, request.param, **CONFIG)


@pytest.fixture(scope="module")
def guarded(start_server, tiny_model):
    """The tiny model behind a token, one request at a time (a later one waits for the one before to end)."""
    return start_server(tiny_model, server={"http_port": free_port(), "auth_token": TOKEN},
                        optimization=ONE_AT_A_TIME, limits={"max_context_length": CONTEXT})


@pytest.fixture()
async def keyed(guarded):
    """A client of the guarded server with its key."""
    async with client(guarded, TOKEN) as api:
        yield api


def client(server, key="unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.http_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture()
async def api(server):
    async with client(server) as api:
        yield api


def ask(content=QUESTION, max_tokens=24, sampling=None, **extra) -> dict:
    """messages.create's arguments, greedy: the SDK (2.x) has no sampling arguments, so temperature goes
    in extra_body, as a client that sends it does."""
    return {"model": "any", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}],
            "extra_body": {"temperature": 0, **(sampling or {})}, **extra}


def counting(args: dict) -> dict:
    """count_tokens' arguments for the same prompt (it takes no max_tokens nor sampling)."""
    return {key: value for key, value in args.items() if key not in ("max_tokens", "extra_body")}


def raw(args: dict) -> dict:
    """The JSON body the SDK sends for these arguments."""
    return {**{key: value for key, value in args.items() if key != "extra_body"}, **args["extra_body"]}


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


async def raw_events(server, body: dict, headers=None) -> list[tuple[str, dict]]:
    """A streamed answer's server-sent events as they came: (event name, data), pings included."""
    events, name = [], None
    async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
        async with http.stream("POST", "/v1/messages", json={**raw(body), "stream": True}, headers=headers) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
    return events


async def test_a_message_has_text_usage_and_a_stop_reason(api):
    message = await api.messages.create(**ask())
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text.strip()
    assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 24
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert (message.stop_reason == "max_tokens") == (message.usage.output_tokens == 24)


async def test_a_system_prompt_as_a_string_or_as_text_blocks_is_read_the_same(api):
    pirate = "You are a pirate. Answer as one."
    said = await api.messages.create(**ask(system=pirate))
    block = await api.messages.create(**ask(system=[{"type": "text", "text": pirate}]))
    assert (text_of(block), block.usage) == (text_of(said), said.usage)
    two = [{"type": "text", "text": pirate}, {"type": "text", "text": "Say arr often."}]
    assert (await api.messages.count_tokens(**counting(ask(system=two)))).input_tokens > said.usage.input_tokens


async def test_a_stream_tells_the_same_text_as_the_whole_message(api):
    whole = await api.messages.create(**ask(max_tokens=32))
    async with api.messages.stream(**ask(max_tokens=32)) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == text_of(whole)  # greedy: the same answer, in pieces
    assert (text_of(final), [block.type for block in final.content], final.stop_reason, final.usage) == \
        (text_of(whole), ["text"], whole.stop_reason, whole.usage)


async def test_the_raw_stream_is_anthropics_event_sequence(server):
    events = await raw_events(server, ask(max_tokens=16), headers={"anthropic-version": "2023-06-01"})
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events if name != "ping"]
    deltas = names[2:-3]
    assert names[:2] == ["message_start", "content_block_start"] and set(deltas) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "ping" in [name for name, _ in events]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 5
    assert events[[name for name, _ in events].index("content_block_start")][1]["content_block"] == \
        {"type": "text", "text": ""}
    assert all(data["delta"]["type"] == "text_delta" and data["index"] == 0
               for name, data in events if name == "content_block_delta")
    end = next(data for name, data in events if name == "message_delta")
    assert end["delta"]["stop_reason"] in ("end_turn", "max_tokens") and 0 < end["usage"]["output_tokens"] <= 16


def the_tool_use(message):
    """The one tool_use of an answer that had to call a tool, its input checked against the tool's schema."""
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, SCHEMAS[uses[0].name])
    return uses[0]


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}], ids=["tool", "any"])
async def test_a_forced_tool_use_matches_its_schema_and_its_result_gets_a_text_answer(api, choice):
    first = await api.messages.create(**ask(max_tokens=40, tools=TOOLS, tool_choice=choice))
    use = the_tool_use(first)
    assert use.name == "get_weather" if choice["type"] == "tool" else use.name in SCHEMAS
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny and 22 degrees Celsius"}
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.content},
                {"role": "user", "content": [result]}]
    answer = await api.messages.create(**{**ask(max_tokens=40, tools=TOOLS), "messages": messages})
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer).strip()
    assert not [block for block in answer.content if block.type == "tool_use"]
    assert answer.usage.input_tokens > first.usage.input_tokens + 10  # the call and its result are read


async def test_a_streamed_tool_use_comes_as_input_json_deltas(api, server):
    args = ask(max_tokens=40, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    whole = the_tool_use(await api.messages.create(**args))
    async with api.messages.stream(**args) as stream:
        final = await stream.get_final_message()
    assert (the_tool_use(final).name, the_tool_use(final).input) == (whole.name, whole.input)
    events = await raw_events(server, args)
    started = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert started[-1] == {"type": "tool_use", "id": started[-1]["id"], "name": "get_weather", "input": {}}
    pieces = [data["delta"]["partial_json"] for name, data in events
              if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"]
    assert len(pieces) >= 2 and json.loads("".join(pieces)) == whole.input
    assert next(data for name, data in events if name == "message_delta")["delta"]["stop_reason"] == "tool_use"


async def test_a_stop_sequence_ends_the_answer_before_it_and_is_named(api):
    uncut = await api.messages.create(**ask(max_tokens=40))
    full = text_of(uncut)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    after = full[len(expected + stop):]  # a stop sequence written after the cut: the first one written is named
    later = next(after[at:at + 4] for at in range(len(after) - 3) if after[at:at + 4] not in expected + stop)
    stops = [later, "never-written-here", stop]
    whole = await api.messages.create(**ask(max_tokens=40, stop_sequences=stops))
    assert (text_of(whole), whole.stop_reason, whole.stop_sequence) == (expected, "stop_sequence", stop)
    assert 0 < whole.usage.output_tokens < uncut.usage.output_tokens and whole.usage.input_tokens > 5
    async with api.messages.stream(**ask(max_tokens=40, stop_sequences=stops)) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert (text, final.stop_reason, final.stop_sequence) == (expected, "stop_sequence", stop)
    unmet = await api.messages.create(**ask(max_tokens=40, stop_sequences=["never-written-here"]))
    assert (text_of(unmet), unmet.stop_sequence) == (full, None) and unmet.stop_reason != "stop_sequence"


async def test_count_tokens_is_the_prompt_a_message_reads(api, server):
    counted = (await api.messages.count_tokens(**counting(ask()))).input_tokens
    assert counted == (await api.messages.create(**ask(max_tokens=2))).usage.input_tokens
    events = await raw_events(server, ask(max_tokens=2))
    assert events[0][1]["message"]["usage"]["input_tokens"] == counted
    longer = (await api.messages.count_tokens(**counting(ask(QUESTION + " And in Rome and Madrid?")))).input_tokens
    with_tools = (await api.messages.count_tokens(**counting(ask(tools=TOOLS)))).input_tokens
    assert counted < longer and counted + 20 < with_tools


def refused_with(error, status: int, kind: str, *words: str):
    assert error.status_code == status and set(error.body) == {"type", "error"} and error.body["type"] == "error"
    assert error.body["error"]["type"] == kind and all(word in error.body["error"]["message"] for word in words)


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


@pytest.mark.parametrize("extra, words", [
    ({"max_tokens": anthropic.NOT_GIVEN}, ["max_tokens"]),
    ({"messages": [{"role": "system", "content": "Hi"}]}, ["messages.0.role"]),
    ({"tools": TOOLS, "tool_choice": {"type": "sometimes"}}, ["tool_choice"]),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_mood"}}, ["get_mood"]),
    ({"tool_choice": {"type": "any"}}, ["tool_choice"]),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, ["tools.0", "web_search_20250305"]),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url",
                                                                             "url": "https://x.example/a.png"}}]}]},
     ["base64"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]},
     ["prefill"]),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                 "content": "x"}]}]}, ["tool_use_id"]),
    ({"sampling": {"temperature": -1}}, ["temperature"]), ({"stop_sequences": [""]}, ["stop_sequences"]),
    ({"thinking": {"type": "always"}}, ["thinking"]),
], ids=["no max_tokens", "bad role", "bad tool_choice", "unknown tool", "choice without tools", "server tool",
        "url image", "prefill", "unanswered tool_result", "temperature", "empty stop", "bad thinking"])
async def test_a_bad_request_is_refused_in_anthropics_error_shape(keyed, extra, words):
    with pytest.raises(anthropic.BadRequestError) as refused:
        await keyed.messages.create(**ask(**extra))
    refused_with(refused.value, 400, "invalid_request_error", *words)


async def test_extras_are_accepted_and_a_base64_image_is_refused_only_for_want_of_vision(keyed):
    api = keyed
    message = await api.messages.create(**ask(max_tokens=3, sampling={"unknown_extra": {"a": 1}}),
                                        metadata={"user_id": "someone"},
                                        thinking={"type": "enabled", "budget_tokens": 1024},
                                        extra_headers={"anthropic-beta": "whatever-2025-01-01"})
    assert message.usage.output_tokens == 3
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        await api.messages.create(**ask(content=[image, {"type": "text", "text": "What is this?"}]))
    refused_with(refused.value, 400, "invalid_request_error", "does not take images")


async def test_the_key_is_checked(guarded, keyed):
    async with client(guarded, "wrong") as wrong:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await wrong.messages.count_tokens(**counting(ask()))
    refused_with(refused.value, 401, "authentication_error", "API key")
    assert (await keyed.messages.count_tokens(**counting(ask()))).input_tokens > 5
    async with anthropic.AsyncAnthropic(base_url=guarded.http_url, auth_token=TOKEN, max_retries=0) as bearer:
        assert (await bearer.messages.count_tokens(**counting(ask()))).input_tokens > 5  # ANTHROPIC_AUTH_TOKEN's


async def scrape(server) -> dict:
    async with httpx.AsyncClient(base_url=server.http_url, headers={"x-api-key": TOKEN}) as http:
        response = await http.get("/metrics")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


async def test_a_client_that_leaves_mid_stream_cancels_its_message(guarded, keyed):
    api = keyed
    before = await scrape(guarded)
    async with api.messages.stream(**ask(max_tokens=400)) as stream:
        async for text in stream.text_stream:
            if text:
                break
    await guarded.wait_for_output("cancelled: its HTTP client left")
    # one at a time: this one starts once the one before has ended
    assert (await api.messages.create(**ask(max_tokens=4))).usage.output_tokens == 4
    after = await scrape(guarded)
    cancelled = ("llmws_requests_total", (("outcome", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0) == 1
    generated = ("llmws_generated_tokens_total", ())
    assert after[generated] - before.get(generated, 0) < 400 + 4


async def test_too_long_a_prompt_is_refused_with_the_figures_whole_or_streamed(keyed):
    """Whole, a 400; streamed, a 400 too, or the stream's error event with the same body where the request
    was queued (behind the count before it, say) when the worker tokenized it."""
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError if not stream else anthropic.APIStatusError) as refused:
            if stream:
                async with keyed.messages.stream(**ask(TOO_LONG)) as events:
                    await events.get_final_message()
            else:
                await keyed.messages.create(**ask(TOO_LONG))
        error = refused.value
        refused_with(error, error.status_code if stream else 400, "invalid_request_error", "Context too long")
        assert error.status_code in (200, 400) and error.body["error"]["max_context"] == CONTEXT
