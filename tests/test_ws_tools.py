"""Tool calls and structured output over the WebSocket, against a real server with the default model: the
tool_call messages and their resume, json_schema answers, logprobs, the refusals, the Python API's Answer
and llm.py's --json-schema and --tools."""
import asyncio
import json

import jsonschema
import pytest
from conftest import Client
from test_client import CuttableProxy, run_llm

from llm import Answer, LLMWSEnhancedClient, LLMWSError

GREEDY = {"temperature": 0, "max_new_tokens": 60}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = "What is the weather in Paris?"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
ENVELOPE = ("request_id", "seq", "id")  # what differs between two runs of the same request


def weather_call(request_id: str) -> dict:
    return {"type": "inference", "request_id": request_id, "prompt": {"user": QUESTION}, "tools": TOOLS,
            "tool_choice": NAMED, "config": GREEDY}


def tool_calls_of(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["type"] == "tool_call"]


def without_envelope(messages: list[dict]) -> list[str]:
    """The messages as JSON text, less what two runs of one request do not share (ids, numbering)."""
    return [json.dumps({k: v for k, v in m.items() if k not in ENVELOPE}) for m in messages]


def arguments_of(messages: list[dict], index: int = 0) -> str:
    return "".join(m["arguments"] for m in tool_calls_of(messages) if m["index"] == index)


@pytest.fixture(scope="module")
def server(start_server, default_model):
    return start_server(default_model)


@pytest.fixture(scope="module")
def reference(server) -> list[dict]:
    """An uninterrupted greedy weather call, start to done."""
    async def run():
        client = await Client.open(server.url)
        messages = await client.until_done(weather_call("reference"))
        await client.close()
        return messages
    return asyncio.run(run())


def test_a_named_tool_choice_streams_one_call_whose_arguments_match_its_schema(reference):
    assert [m["type"] for m in reference][0] == "start" and reference[-1]["type"] == "done"
    calls = tool_calls_of(reference)
    head, pieces = calls[0], calls[1:]
    assert head["index"] == 0 and head["name"] == "get_weather" and head["arguments"] == ""
    assert head["id"].startswith("call_") and len(head["id"]) > 10
    assert len(pieces) >= 2 and all("id" not in m and "name" not in m and m["index"] == 0 for m in pieces)
    assert all(m["request_id"] == "reference" for m in reference)
    assert [m["seq"] for m in reference] == list(range(reference[0]["seq"], reference[0]["seq"] + len(reference)))
    assert not [m for m in reference if m["type"] == "token" and m["data"]]  # the answer is the call alone
    arguments = json.loads(arguments_of(reference))
    jsonschema.validate(arguments, WEATHER)
    assert reference[-1]["finish_reason"] == "tool_calls"


async def test_a_drop_mid_arguments_resumes_byte_identical(server, reference):
    """Cut after the call's first piece of arguments; the resume sends the rest from last_seq + 1, and the
    whole stream is what an uninterrupted run gave (ids aside) and what the buffer replays, byte for byte."""
    client = await Client.open(server.url)
    await client.send(weather_call("resume-me"))
    raw = []  # the frames as they came, text
    while not (len(tool_calls_of([json.loads(frame) for frame in raw])) >= 2):
        raw.append(await asyncio.wait_for(client.ws.recv(), 120))
    assert json.loads(raw[-1])["arguments"] != ""  # the drop comes just after the first piece of arguments
    await client.ws.close()
    last_seq = json.loads(raw[-1])["seq"]
    resumed = await Client.open(server.url, {"session_id": client.session_id, "last_seq": last_seq})
    assert resumed.welcome["resumed"] is True
    after = []
    while not after or json.loads(after[-1])["type"] != "done":
        after.append(await asyncio.wait_for(resumed.ws.recv(), 120))
    messages = [json.loads(frame) for frame in raw + after]
    assert [m["seq"] for m in messages[len(raw):]] == list(range(last_seq + 1, last_seq + 1 + len(after)))
    assert [m["seq"] for m in messages] == list(range(messages[0]["seq"], messages[0]["seq"] + len(messages)))
    assert without_envelope(tool_calls_of(messages)) == without_envelope(tool_calls_of(reference))
    assert without_envelope(messages[1:-1]) == without_envelope(reference[1:-1])
    assert len({m["id"] for m in tool_calls_of(messages) if "id" in m}) == 1
    assert messages[-1]["finish_reason"] == "tool_calls"
    await resumed.close()
    # The buffer replays the same frames, byte for byte
    again = await Client.open(server.url, {"session_id": client.session_id})
    replayed = [await asyncio.wait_for(again.ws.recv(), 60) for _ in raw + after]
    assert replayed == raw + after
    assert (await again.request({"type": "ack"}))["type"] == "ack_received"
    await again.close()


async def test_a_json_schema_response_format_gives_text_that_validates(server):
    client = await Client.open(server.url)
    messages = await client.until_done({"type": "inference", "prompt": {"user": "Give a person as JSON"},
                                        "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "person", "schema": PERSON}},
                                        "config": GREEDY})
    assert messages[-1]["type"] == "done" and messages[-1]["finish_reason"] == "stop", messages[-1]
    assert not tool_calls_of(messages)
    jsonschema.validate(json.loads("".join(m["data"] for m in messages if m["type"] == "token")), PERSON)
    await client.close()


async def test_logprobs_come_with_each_token(server):
    client = await Client.open(server.url)
    messages = await client.until_done({"type": "inference", "prompt": {"user": "Hi"}, "logprobs": 2,
                                        "config": {"temperature": 0, "max_new_tokens": 4}})
    tokens = [m for m in messages if m["type"] == "token"]
    shown = [each for m in tokens for each in m["logprobs"]]
    assert len(shown) == messages[-1]["total_tokens"] == 4
    assert "".join(each["token"] for each in shown) == "".join(m["data"] for m in tokens)
    for each in shown:
        assert each["logprob"] <= 0 and len(each["top_logprobs"]) == 2
        assert each["top_logprobs"][0] == [each["token"], each["logprob"]]  # greedy: the likeliest
    await client.close()


BIG_SCHEMA = {"type": "object", "description": "x" * 33000}


@pytest.mark.parametrize("frame, named", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BIG_SCHEMA}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_nope", "content": "y"}]},
     "messages[1].tool_call_id"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": BIG_SCHEMA}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format"),
    ({"config": {"seed": -1}}, "seed"),
    ({"config": {"presence_penalty": 3}}, "presence_penalty"),
])
async def test_refusals_name_the_field_and_the_connection_stays_open(server, frame, named):
    client = await Client.open(server.url)
    message = {"type": "inference", "prompt": {"user": "x"}, "config": {"max_new_tokens": 2}, **frame}
    if "messages" in frame:
        del message["prompt"]
    refusal = await client.request(message)
    assert refusal["type"] == "error" and named in refusal["message"], refusal
    assert "seq" not in refusal and "request_id" not in refusal  # nothing was queued
    after = await client.until_done({"type": "inference", "prompt": {"user": "Hi"},
                                     "config": {"temperature": 0, "max_new_tokens": 2}})
    assert after[-1]["type"] == "done" and after[-1]["total_tokens"] == 2
    await client.close()


async def test_the_client_returns_the_calls_and_carries_them_through_a_cut(server, reference):
    """inference() with tools gives an Answer: "" with its tool_calls; a cut just after the call's first piece
    of arguments is resumed like a cut in text, and the result goes back as a tool turn."""
    proxy = CuttableProxy(server.port)
    await proxy.start()
    statuses, pieces = [], []

    def cut_at_the_first_argument(message):
        if message.get("type") == "tool_call" and message["arguments"] and not pieces:
            pieces.append(message)
            proxy.cut()
    client = LLMWSEnhancedClient("127.0.0.1", proxy.port, on_message=cut_at_the_first_argument,
                                 on_status=statuses.append)
    await client.connect()
    answer = await asyncio.wait_for(client.inference(QUESTION, tools=TOOLS, tool_choice=NAMED, **GREEDY), 180)
    assert "reconnected" in statuses and client.welcome["resumed"] is True
    assert isinstance(answer, Answer) and isinstance(answer, str) and answer == ""
    assert answer.finish_reason == "tool_calls" and answer.reasoning == ""
    [call] = answer.tool_calls
    assert set(call) == {"id", "name", "arguments"} and call["id"].startswith("call_")
    assert call["name"] == "get_weather" and call["arguments"] == arguments_of(reference)
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    assert client.last_tool_calls == answer.tool_calls and client.last_done["finish_reason"] == "tool_calls"
    turn = answer.as_message()
    assert turn == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]}
    # The call's result goes back, and the answer is text: a plain Answer, as before
    followed = await client.inference(messages=[{"role": "user", "content": QUESTION}, turn,
                                                {"role": "tool", "tool_call_id": call["id"], "content": '{"c": 18}'}],
                                      tools=TOOLS, tool_choice="none", temperature=0, max_new_tokens=12)
    assert followed and followed.tool_calls == [] and client.last_tool_calls == []
    assert followed.finish_reason in ("stop", "length") and followed.as_message() == {"role": "assistant",
                                                                                      "content": str(followed)}
    with pytest.raises(LLMWSError, match="tool_choice"):
        await client.inference(QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    streamed = [piece async for piece in client.stream("Hi", logprobs=1, temperature=0, max_new_tokens=3)]
    assert len(client.last_logprobs) == 3 and "".join(e["token"] for e in client.last_logprobs) == "".join(streamed)
    await client.disconnect()
    await proxy.stop()


def llm_args(server, *args) -> list[str]:
    return ["--port", str(server.port), "--host", "127.0.0.1", "--temperature", "0", "--max-tokens", "60", *args]


def test_llm_json_schema_prints_json_that_validates(server, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    result = run_llm("--prompt", "Give a person as JSON", "--json-schema", str(schema), *llm_args(server))
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), PERSON)


@pytest.mark.parametrize("content, reason", [(None, "cannot read it"), ("{not json", "not JSON"),
                                             ("[1, 2]", "not a JSON schema")])
def test_llm_json_schema_that_cannot_be_used_fails_with_one_line(tmp_path, content, reason):
    schema = tmp_path / "schema.json"
    if content is not None:
        schema.write_text(content)
    # No server on that port: the file is checked before connecting
    result = run_llm("--prompt", "hi", "--json-schema", str(schema), "--port", "9", "--host", "127.0.0.1")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--json-schema" in result.stderr and str(schema) in result.stderr and reason in result.stderr


def test_llm_tools_prints_each_call_as_a_json_line(server, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOLS[0], TOOLS[1]["function"]]))  # a bare function is taken as a tool too
    result = run_llm("--prompt", QUESTION, "--tools", str(tools), "--tool-choice", "get_weather", *llm_args(server))
    assert result.returncode == 0, result.stderr
    [call] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    unknown = run_llm("--prompt", QUESTION, "--tools", str(tools), "--tool-choice", "nope", *llm_args(server))
    assert unknown.returncode == 1 and "tool_choice" in unknown.stderr
