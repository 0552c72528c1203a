"""Embeddings through the real `openai` package (/v1/embeddings) and the WebSocket `embed` message, on the
default model under transformers and, from its GGUF, under llama.cpp (the pooling a sentence-transformers
folder names: tests/unit/engines/transformers/test_embedding.py)."""
import array
import base64
import json
import math

import openai
import pytest
from conftest import BLOCKER, ENGINES, Client, engine_server, free_port

MAX_INPUTS = 4
CONFIG = {"limits": {"max_context_length": 512, "max_embedding_inputs": MAX_INPUTS}}
TEXTS = ["The cat sat on the mat.", "Quarterly revenue rose by four percent.", "A kitten rested on the rug."]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, start_server, default_model):
    return engine_server(start_server, default_model, request.param, **CONFIG)


@pytest.fixture()
def api(server):
    return openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors are unit length


async def test_vectors_are_unit_length_the_same_for_the_same_text_and_closer_for_closer_meaning(api):
    answer = await api.embeddings.create(model="any", input=[*TEXTS, TEXTS[0]])
    vectors = [item.embedding for item in answer.data]
    assert [item.index for item in answer.data] == [0, 1, 2, 3]
    assert len({len(vector) for vector in vectors}) == 1 and len(vectors[0]) == 576  # the model's hidden size
    assert all(math.isclose(math.hypot(*vector), 1, abs_tol=1e-4) for vector in vectors)
    assert vectors[3] == pytest.approx(vectors[0], abs=1e-6)  # one batch (llama.cpp: float error)
    again = (await api.embeddings.create(model="any", input=TEXTS[0])).data[0].embedding
    assert again == (await api.embeddings.create(model="any", input=TEXTS[0])).data[0].embedding  # exactly, alone
    assert vectors[1] != vectors[0]
    assert cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[1])  # cat and kitten, not revenue
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 4 * 4


async def test_a_batch_gives_each_input_what_it_gets_alone(api):
    together = await api.embeddings.create(model="any", input=TEXTS)
    for text, item in zip(TEXTS, together.data):
        alone = (await api.embeddings.create(model="any", input=text)).data[0].embedding
        assert max(abs(x - y) for x, y in zip(alone, item.embedding)) < 1e-4


async def test_base64_holds_the_same_little_endian_floats_and_token_ids_are_taken(api):
    floats = (await api.embeddings.create(model="any", input=TEXTS[0])).data[0].embedding
    raw = await api.embeddings.with_raw_response.create(model="any", input=TEXTS[0], encoding_format="base64")
    encoded = json.loads(raw.http_response.text)["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(array.array("f", base64.b64decode(encoded))) == pytest.approx(floats, abs=1e-6)
    by_ids = await api.embeddings.create(model="any", input=[[504, 2470, 2102, 335, 260, 9281, 30]])
    assert len(by_ids.data[0].embedding) == len(floats)


@pytest.mark.parametrize("body, named", [
    ({"input": []}, "input"),
    ({"input": [""]}, "empty"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "max_embedding_inputs"),
    ({"input": ["a", [1, 2]]}, "not a mix"),
    ({"input": "word " * 800}, "at most 512"),
    ({"input": "a", "dimensions": 8}, "cannot be shortened"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
])
async def test_refusals_are_400s_that_name_the_limit(api, body, named):
    with pytest.raises(openai.BadRequestError, match=named):
        await api.embeddings.create(model="any", **body)
    assert (await api.embeddings.create(model="any", input="still served")).data  # nothing else changed


async def test_the_websocket_embed_message_answers_beside_a_running_generation(server):
    client = await Client.open(server.url)
    try:
        await client.send(BLOCKER)  # thousands of tokens: the embedding must not wait for them
        assert (await client.until("start"))[-1]["request_id"] == "blocker"
        await client.send({"type": "embed", "input": TEXTS[:2], "request_id": "e1"})
        got = await client.until("embeddings", "error")
        assert got[-1]["type"] == "embeddings" and got[-1]["request_id"] == "e1", got[-1]
        assert len(got[-1]["data"]) == 2 and got[-1]["tokens"] > 0
        assert not any(m["type"] == "done" for m in got)  # the long answer was still generating
        await client.send({"type": "embed", "input": TEXTS[:2], "request_id": "e1"})  # asked again: answered again
        again = (await client.until("embeddings"))[-1]
        assert again["data"] == got[-1]["data"]
        await client.send({"type": "embed", "input": ["a"] * (MAX_INPUTS + 1), "request_id": "e2"})
        refused = (await client.until("error"))[-1]
        assert refused["request_id"] == "e2" and "max_embedding_inputs" in refused["message"]
        await client.send({"type": "cancel", "request_id": "blocker"})
        assert (await client.until("done"))[-1]["finish_reason"] == "cancelled"
    finally:
        await client.close()


async def test_an_embedding_is_answered_beside_a_full_batch(start_server, tiny_model):
    """A short job takes no batch slot: with both slots generating, /v1/embeddings is answered at once."""
    full = start_server(tiny_model, server={"http_port": free_port()}, optimization={"max_batch_size": 2})
    client = await Client.open(full.url)
    api = openai.AsyncOpenAI(base_url=full.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        for request_id in ("first", "second"):
            await client.send({**BLOCKER, "request_id": request_id})
        started = [m for m in await client.until("start") + await client.until("start") if m["type"] == "start"]
        assert {m["request_id"] for m in started} == {"first", "second"}  # the batch is full
        assert len((await api.embeddings.create(model="any", input=TEXTS[:2])).data) == 2
        for request_id in ("first", "second"):
            await client.send({"type": "cancel", "request_id": request_id})
        ends = [m for m in await client.until("done") + await client.until("done") if m["type"] == "done"]
        assert [m["finish_reason"] for m in ends] == ["cancelled", "cancelled"]  # both still ran till then
    finally:
        await client.close()


async def test_embed_requests_in_flight_together_are_each_answered(server):
    client = await Client.open(server.url)
    try:
        for index in range(3):
            await client.send({"type": "embed", "input": TEXTS[index], "request_id": f"e{index}"})
        replies = [(await client.until("embeddings", "error"))[-1] for _ in range(3)]
        assert sorted(reply.get("request_id") for reply in replies) == ["e0", "e1", "e2"], replies
        vectors = {reply["request_id"]: reply["data"][0] for reply in replies}
        assert len({json.dumps(vector) for vector in vectors.values()}) == 3
    finally:
        await client.close()
