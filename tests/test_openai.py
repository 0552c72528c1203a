"""The OpenAI-compatible HTTP API, driven by the official `openai` package (and httpx for what the SDK
hides): the same model, FIFO and limits as the WebSocket, answers equal to the WebSocket's."""
import asyncio
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import BLOCKER, ONE_AT_A_TIME, REPO, Client, free_port, inference, text_of
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Tell me about rivers"
TOKEN = "http-secret"


@pytest.fixture(scope="module")
def http_server(start_server, tiny_model):
    # stream_resume_s 0: a stream's client that leaves cancels it at once (tests/test_stream_resume.py: later)
    return start_server(tiny_model, server={"http_port": free_port()},
                        limits={"max_context_length": 512, "stream_resume_s": 0})


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


async def test_max_completion_tokens_bounds_the_answer_as_max_tokens_does(api):
    by_max_tokens = await api.chat.completions.create(**chat_args(7))
    args = chat_args()
    del args["max_tokens"]
    by_new_name = await api.chat.completions.create(**args, max_completion_tokens=7)
    assert by_new_name.usage.completion_tokens == 7 and by_new_name.choices[0].finish_reason == "length"
    assert by_new_name.choices[0].message.content == by_max_tokens.choices[0].message.content
    longer = await api.chat.completions.create(**args, max_completion_tokens=9)
    assert longer.usage.completion_tokens == 9


async def test_up_to_four_stop_strings_are_taken_and_a_fifth_is_refused(api):
    stops = ["zq1", "zq2", "zq3", "zq4", "zq5"]  # never in the answer: it runs to its length
    four = await api.chat.completions.create(**chat_args(6), stop=stops[:4])
    assert four.choices[0].finish_reason == "length" and four.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**chat_args(6), stop=stops)
    assert refused.value.body["param"] == "stop" and "up to 4" in refused.value.body["message"]


@pytest.mark.parametrize("extra, param", [({"temperature": -1}, "temperature"), ({"n": 99}, "n"),
                                          ({"max_tokens": 0}, "max_tokens"), ({"top_p": 2}, "top_p"),
                                          ({"stop": [""]}, "stop"), ({"messages": []}, "messages"),
                                          ({"messages": [{"role": "tool", "content": "x"}]},
                                           "messages[0].tool_call_id")])
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


async def test_a_request_that_waits_is_told_its_place_and_shares_the_fifo(start_server, tiny_model):
    http_server = start_server(tiny_model, server={"http_port": free_port()}, optimization=ONE_AT_A_TIME)
    api = openai.AsyncOpenAI(base_url=http_server.http_url + "/v1", api_key="unused", max_retries=0)
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
    with pytest.raises(openai.AuthenticationError):  # every endpoint, not just the listing
        await refused.chat.completions.create(**chat_args(4))
    allowed = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=TOKEN, max_retries=0)
    assert (await allowed.chat.completions.create(**chat_args(4))).usage.completion_tokens == 4
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        foreign = await http.get("/v1/models", headers={"Origin": "https://evil.example",
                                                        "Authorization": f"Bearer {TOKEN}"})
        assert foreign.status_code == 403
        foreign = await http.post("/v1/chat/completions", json=chat_args(4),
                                  headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
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


# -- the Responses API -----------------------------------------------------------------------------------

def response_args(max_output_tokens=60, **extra):
    return {"model": "any", "input": PROMPT, "max_output_tokens": max_output_tokens, "temperature": 0, **extra}


async def test_a_dropped_background_stream_resumes_from_starting_after_with_nothing_lost(api):
    whole = await api.responses.create(**response_args())
    assert whole.status == "incomplete" and whole.usage.output_tokens == 60  # no end token: max_output_tokens
    stream = await api.responses.create(**response_args(), background=True, stream=True)
    before = []
    async for event in stream:
        before.append(event)
        if sum(e.type == "response.output_text.delta" for e in before) == 5:
            break
    await stream.close()  # the connection drops mid-answer; a background response goes on
    response_id = before[0].response.id
    after = [event async for event in await api.responses.retrieve(response_id, stream=True,
                                                                    starting_after=before[-1].sequence_number)]
    numbers = [event.sequence_number for event in before + after]
    assert numbers == list(range(len(numbers)))  # no gap, no duplicate
    deltas = "".join(e.delta for e in before + after if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert after[-1].type == "response.incomplete" and after[-1].response.output_text == whole.output_text
    again = await api.responses.retrieve(response_id)
    assert again.output_text == whole.output_text and again.usage.output_tokens == 60
    replayed = [event async for event in await api.responses.retrieve(response_id, stream=True)]
    assert [(e.sequence_number, e.type) for e in replayed] == [(e.sequence_number, e.type) for e in before + after]


async def test_background_responses_can_be_cancelled_queued_or_running(start_server, tiny_model):
    http_server = start_server(tiny_model, server={"http_port": free_port()}, optimization=ONE_AT_A_TIME)
    api = openai.AsyncOpenAI(base_url=http_server.http_url + "/v1", api_key="unused", max_retries=0)
    client = await Client.open(http_server.url)
    await client.send(BLOCKER)
    await client.until("start")
    queued = await api.responses.create(**response_args(), background=True)
    assert queued.status == "queued"
    cancelled = await api.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output == []
    await client.send({"type": "cancel", "request_id": "blocker"})
    await client.until("done")
    await client.close()
    running = await api.responses.create(**response_args(4000), background=True, stream=True)
    async for event in running:
        if event.type == "response.output_text.delta":
            break
    await running.close()
    stopped = await api.responses.cancel(event.item_id.replace("msg_", "resp_"))
    assert stopped.status == "cancelled" and 0 < stopped.usage.output_tokens < 400
    assert (await api.responses.retrieve(stopped.id)).status == "cancelled"


async def test_responses_instructions_are_the_system_turn(api):
    instructions = "You are a pirate. Answer in one word."
    told = await api.responses.create(**response_args(12), instructions=instructions)
    untold = await api.responses.create(**response_args(12))
    chat = await api.chat.completions.create(**chat_args(12, messages=[{"role": "system", "content": instructions},
                                                                       {"role": "user", "content": PROMPT}]))
    assert told.output_text == chat.choices[0].message.content != untold.output_text


async def test_responses_refuse_what_they_cannot_do_and_unknown_ids(api):
    with pytest.raises(openai.BadRequestError) as refused:
        await api.responses.create(**response_args(), background=True, store=False)
    assert refused.value.body["param"] == "store"
    with pytest.raises(openai.BadRequestError) as refused:
        await api.responses.create(**response_args(max_output_tokens=0))
    assert refused.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve("resp_" + "0" * 32)
    unstored = await api.responses.create(**response_args(8), store=False)
    assert unstored.usage.output_tokens == 8
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(unstored.id)


async def scrape(http_server) -> dict:
    """/metrics through prometheus_client's own parser: {(sample name, labels): value}."""
    async with httpx.AsyncClient(base_url=http_server.http_url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


async def test_metrics_count_what_happened(api, http_server):
    before = await scrape(http_server)
    completion = await api.chat.completions.create(**chat_args(7))
    client = await Client.open(http_server.url)
    streamed = await client.until_done(inference(PROMPT, max_new_tokens=3))
    await client.close()
    resumed = await Client.open(http_server.url, {"session_id": client.session_id, "last_seq": 0})
    await resumed.close()
    after = await scrape(http_server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("llmws_generated_tokens_total") == 7 + 3
    assert grew("llmws_prompt_tokens_total") == 2 * completion.usage.prompt_tokens
    assert grew("llmws_requests_total", outcome="length") == 2
    assert grew("llmws_time_to_first_token_seconds_count") == 2
    assert grew("llmws_tokens_per_second_count") == 2
    assert grew("llmws_resumes_total") == 1
    assert grew("llmws_replayed_messages_total") == sum("seq" in message for message in streamed)
    for gauge in ("llmws_queue_depth", "llmws_sessions", "llmws_process_resident_bytes", "llmws_device_free_bytes"):
        assert (gauge, ()) in after
    assert after[("llmws_process_resident_bytes", ())] > 10 * 2 ** 20


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}


async def test_a_responses_function_tool_gives_a_function_call_item_streamed_and_stored(api):
    """tool_choice required on the tiny random model: the call is decoded under the tool's grammar, so its
    arguments validate; streamed, the arguments come in deltas that make the done event's arguments; the
    stored response tells the same call again; a later turn takes the call and its output as input."""
    import json

    import jsonschema

    args = {**response_args(60), "tools": [WEATHER], "tool_choice": "required"}
    whole = await api.responses.create(**args)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert whole.status == "completed" and whole.usage.output_tokens < 60  # the grammar ended it
    events = [event async for event in await api.responses.create(**args, stream=True)]
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert len(deltas) >= 2 and "".join(deltas) == done.arguments == calls[0].arguments  # greedy: the same
    stored = await api.responses.retrieve(events[0].response.id)
    assert [(item.name, item.arguments) for item in stored.output if item.type == "function_call"] == [
        ("get_weather", calls[0].arguments)]
    follow = await api.responses.create(**{**response_args(8), "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"}]})
    assert follow.usage.output_tokens == 8 and follow.output_text


async def test_responses_text_format_gives_json_that_validates_and_odd_tools_are_refused(api):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    shaped = await api.responses.create(**response_args(60), text={"format": {"type": "json_schema", "name": "p",
                                                                             "schema": schema}})
    jsonschema.validate(json.loads(shaped.output_text), schema)
    with pytest.raises(openai.BadRequestError) as refused:
        await api.responses.create(**response_args(), tools=[{"type": "web_search"}])
    assert refused.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as refused:
        await api.responses.create(**response_args(), text={"format": {"type": "json_schema", "name": "p",
                                                                       "schema": {"type": "strin"}}})
    assert refused.value.body["param"] == "text.format.schema"
