"""Tool calls, structured output, seed, logprobs, n and the OpenAI penalties, through real clients (the
`openai` package and LangChain's ChatOpenAI): on the default model under transformers and, from its GGUF,
under llama.cpp; and on the tiny random model, which only constrained decoding can make write JSON."""
import asyncio
import json

import jsonschema
import openai
import pytest
from conftest import ENGINES, engine_server, free_port
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from llmws_server.core.constraints import MAX_SCHEMA_BYTES

BATCH = 4  # optimization.max_batch_size of these servers: the most choices `n` may ask for
CONFIG = {"optimization": {"max_batch_size": BATCH}, "limits": {"max_context_length": 2048}}
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME_PARAMETERS}}]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = "What is the weather in Paris?"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest.fixture(scope="module", params=ENGINES)
def server(request, start_server, default_model):
    """The default model on each engine, sharing the module."""
    return engine_server(start_server, default_model, request.param, **CONFIG)


@pytest.fixture(scope="module")
def tiny_http(start_server, tiny_model):
    return start_server(tiny_model, server={"http_port": free_port()})


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def api(server):
    return client(server)


def chat(content=QUESTION, max_tokens=60, **extra) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def the_call(completion):
    """The one tool call of a whole answer that had to call one, checked against its tool's schema."""
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    return call


@pytest.mark.parametrize("choice", [NAMED, "required"], ids=["named", "required"])
async def test_a_named_or_required_call_matches_its_tools_schema(api, choice):
    call = the_call(await api.chat.completions.create(**chat(tools=TOOLS, tool_choice=choice)))
    assert call.function.name == "get_weather" if choice == NAMED else call.function.name in PARAMETERS


async def test_a_streamed_call_sends_id_and_name_first_then_its_arguments_in_pieces(api):
    whole = the_call(await api.chat.completions.create(**chat(tools=TOOLS, tool_choice=NAMED)))
    chunks = [chunk async for chunk in await api.chat.completions.create(**chat(tools=TOOLS, tool_choice=NAMED),
                                                                          stream=True)]
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    pieces = [piece for delta in deltas for piece in delta.tool_calls or []]
    first, rest = pieces[0], pieces[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id.startswith("call_")
    assert len(rest) >= 2 and all((piece.index, piece.id, piece.type, piece.function.name) == (0, None, None, None)
                                  for piece in rest)
    assert (first.function.arguments or "") + "".join(piece.function.arguments for piece in rest) == \
        whole.function.arguments  # greedy: the same call as the whole answer's
    assert "".join(delta.content or "" for delta in deltas) == ""
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"


async def test_the_turn_after_a_tool_result_is_a_text_answer(api):
    first = await api.chat.completions.create(**chat(tools=TOOLS, tool_choice=NAMED))
    call = the_call(first)
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny and 22 degrees Celsius"}]
    answer = await api.chat.completions.create(model="any", messages=messages, tools=TOOLS, max_tokens=40,
                                               temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content.strip()
    assert not choice.message.tool_calls
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are read


async def test_an_answer_alone_right_after_a_batch_of_calls_is_unchanged(api):
    """Calls that end in the batch (their schema complete, the batch still in a step), then a request
    alone at once: the batch's step and the request's do not mix (transformers sets is_causal on the
    model's config during a forward, and a solo step that overlapped a batch step once kept it)."""
    plain = chat("Write a poem.", 12)
    before = text_of(await api.chat.completions.create(**plain))
    for _ in range(3):
        calls = await asyncio.gather(*[api.chat.completions.create(**chat(tools=TOOLS, tool_choice=NAMED))
                                       for _ in range(2)])
        assert [the_call(call).function.name for call in calls] == ["get_weather"] * 2
        assert text_of(await api.chat.completions.create(**plain)) == before


async def test_response_format_gives_json_that_matches(api):
    person = await api.chat.completions.create(**chat("Invent a person.", response_format=PERSON_FORMAT))
    assert person.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)
    anything = await api.chat.completions.create(**chat("Describe a person as JSON with a name and an age.",
                                                        response_format={"type": "json_object"}))
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def text_of(completion) -> str:
    return completion.choices[0].message.content


async def test_a_seed_draws_the_same_text_alone_and_in_a_batch(api):
    seeded = chat("Write a poem about the sea.", 16, temperature=1.0, seed=7)
    alone = text_of(await api.chat.completions.create(**seeded))
    assert text_of(await api.chat.completions.create(**seeded)) == alone
    assert text_of(await api.chat.completions.create(**{**seeded, "seed": 8})) != alone
    others = [api.chat.completions.create(**chat(f"Tell me about {topic}.", 24, temperature=1.0))
              for topic in ("cats", "rain", "bread")]
    *_, together = await asyncio.gather(*others, api.chat.completions.create(**seeded))
    assert text_of(together) == alone


async def test_chat_logprobs_whole_and_streamed(api):
    args = chat("Tell me about rivers.", 12, logprobs=True, top_logprobs=3)
    whole = await api.chat.completions.create(**args)
    entries = whole.choices[0].logprobs.content
    assert whole.choices[0].finish_reason == "length" and len(entries) == whole.usage.completion_tokens == 12
    assert "".join(entry.token for entry in entries) == text_of(whole)
    for entry in entries:
        tops = [top.logprob for top in entry.top_logprobs]
        assert entry.logprob <= 0 and len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    chunks = [chunk async for chunk in await api.chat.completions.create(**args, stream=True)]
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [entry.token for entry in streamed] == [entry.token for entry in entries]
    assert [entry.logprob for entry in streamed] == pytest.approx([entry.logprob for entry in entries], abs=1e-4)


async def test_completion_logprobs_whole_and_streamed(api):
    args = {"model": "any", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = await api.completions.create(**args)
    shown = whole.choices[0].logprobs
    assert whole.choices[0].finish_reason == "length"
    assert len(shown.tokens) == len(shown.token_logprobs) == len(shown.top_logprobs) == whole.usage.completion_tokens
    assert "".join(shown.tokens) == whole.choices[0].text
    for token, logprob, top in zip(shown.tokens, shown.token_logprobs, shown.top_logprobs):
        assert logprob <= 0 and len(top) == 2 and all(value <= 0 for value in top.values())
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob)
    assert shown.text_offset == [sum(map(len, shown.tokens[:index])) for index in range(len(shown.tokens))]
    chunks = [chunk async for chunk in await api.completions.create(**args, stream=True)]
    pieces = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
    assert [token for piece in pieces for token in piece.tokens] == shown.tokens
    assert [offset for piece in pieces for offset in piece.text_offset] == shown.text_offset


async def test_n_seeded_choices_differ_repeat_and_add_up(api):
    args = chat("Write a long story about a dragon.", 12, temperature=1.0, seed=3, n=3)
    completion = await api.chat.completions.create(**args)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert [choice.finish_reason for choice in completion.choices] == ["length"] * 3
    assert completion.usage.completion_tokens == 3 * 12
    texts = [choice.message.content for choice in completion.choices]
    assert len(set(texts)) == 3
    again = await api.chat.completions.create(**args)
    assert [choice.message.content for choice in again.choices] == texts


async def test_a_frequency_penalty_changes_an_answer_that_repeats(api):
    args = {"model": "any", "prompt": "one, one, one, one, one, one, one, one,", "max_tokens": 12, "temperature": 0,
            "extra_body": {"repetition_penalty": 1.0}}
    plain = (await api.completions.create(**args)).choices[0].text
    penalised = (await api.completions.create(**args, frequency_penalty=2)).choices[0].text
    assert plain.count("one") >= 5  # greedy, it repeats
    assert penalised.count("one") < plain.count("one")


BIG_SCHEMA = {"type": "object", "properties": {f"field_{index}": {"type": "string", "description": "x" * 100}
                                               for index in range(MAX_SCHEMA_BYTES // 100)}}
ANSWERED_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": BATCH + 1}, "n"),
    ({"messages": [{"role": "user", "content": QUESTION}, ANSWERED_CALL,
                   {"role": "tool", "tool_call_id": "call_b", "content": "Sunny"}]}, "messages[2].tool_call_id"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": BIG_SCHEMA}}},
     "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": PERSON_FORMAT}, "response_format"),
], ids=["bad-schema", "unknown-tool", "top-logprobs", "n", "tool-call-id", "big-schema", "two-shapes"])
async def test_what_cannot_be_honoured_is_refused_naming_the_field(api, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(**{**chat(max_tokens=4), **extra})
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    assert param in refused.value.body["message"]
    answered = await api.chat.completions.create(**chat("Hi", max_tokens=2))
    assert answered.usage.completion_tokens >= 1


async def test_a_random_model_still_calls_and_writes_valid_json(tiny_http):
    """The tiny model has no end token and writes max_tokens of noise: the grammar alone makes it valid,
    and complete before max_tokens."""
    api = client(tiny_http)
    called = await api.chat.completions.create(**chat(tools=TOOLS, tool_choice=NAMED))
    assert the_call(called).function.name == "get_weather" and called.usage.completion_tokens < 60
    person = await api.chat.completions.create(**chat("Invent a person.", response_format=PERSON_FORMAT))
    assert person.choices[0].finish_reason == "stop" and person.usage.completion_tokens < 60
    jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)
    for _ in range(2):  # sharing the batch, each with its own grammar, seed and logprobs
        people = await asyncio.gather(*[api.chat.completions.create(**chat(
            f"Person {index}", response_format=PERSON_FORMAT, temperature=1.0, seed=index, logprobs=True))
            for index in range(BATCH)])
        for person in people:
            assert person.choices[0].finish_reason == "stop"
            assert len(person.choices[0].logprobs.content) == person.usage.completion_tokens
            jsonschema.validate(json.loads(person.choices[0].message.content), PERSON)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


async def test_langchain_binds_tools_and_gets_structured_output(server):
    model = ChatOpenAI(base_url=server.http_url + "/v1", api_key="unused", model="any", temperature=0, max_tokens=60,
                       max_retries=0)
    message = await model.bind_tools([TOOLS[0]], tool_choice="get_weather").ainvoke(QUESTION)
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER_PARAMETERS)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    person = await model.with_structured_output(Person, method="json_schema").ainvoke("Invent a person.")
    assert isinstance(person, Person)
    as_dict = await model.with_structured_output({**PERSON, "title": "person"}, method="json_schema").ainvoke(
        "Invent a person.")
    jsonschema.validate(as_dict, PERSON)
