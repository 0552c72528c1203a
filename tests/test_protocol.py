"""Every message of the core protocol, against a real server running the tiny model."""
import json

import pytest
import torch
from conftest import TINY_MAX_POSITIONS, Client, inference, refused_frame, text_of
from websockets.asyncio.client import connect

from llmws_server.config import DEFAULTS
from llmws_server.engines.transformers.engine import choose_dtype

# What dtype "auto" picks here: float32 on a CPU, bfloat16 (or float16) on a GPU.
AUTO_DTYPE = str(choose_dtype("auto", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
                 ).removeprefix("torch.")

async def test_welcome_carries_every_field(tiny_server):
    client = await Client.open(tiny_server.url)
    welcome = client.welcome
    assert welcome["resumed"] is False and welcome["model"] == "tiny-llama"
    assert {"vision", "flash_attention", "compute_capability", "max_context"} <= set(welcome["capabilities"])
    assert welcome["capabilities"]["dtype"] == AUTO_DTYPE and welcome["capabilities"]["attention"] == "sdpa"
    assert welcome["capabilities"]["max_context"] == TINY_MAX_POSITIONS
    assert welcome["capabilities"]["flash_attention"] is False
    assert set(welcome["resources"]) == {"device", "total_gb", "free_gb", "compute_capability"}
    assert welcome["resources"]["total_gb"] >= welcome["resources"]["free_gb"] > 0
    await client.close()


async def test_inference_streams_start_tokens_done(tiny_server):
    client = await Client.open(tiny_server.url)
    await client.send(inference(max_new_tokens=12))
    messages = [m for m in await client.until("done", "error") if m["type"] != "queued"]
    start, *tokens, done = messages
    assert start["type"] == "start" and start["tokens_in"] > 0 and start["max_tokens"] == 12
    assert all(m["type"] == "token" and isinstance(m["data"], str) for m in tokens)
    assert done["type"] == "done" and done["total_tokens"] == 12 and done["finish_reason"] == "length"
    assert done["tokens_per_s"] > 0
    assert len({m["request_id"] for m in messages}) == 1
    assert [m["seq"] for m in messages] == list(range(messages[0]["seq"], messages[0]["seq"] + len(messages)))
    await client.close()


async def run_to_done(client, message) -> list[dict]:
    """The request's stream, less any `queued` (a test before may still be finishing on the worker)."""
    await client.send(message)
    return [m for m in await client.until("done", "error") if m["type"] != "queued"]


async def test_three_prompt_forms_give_the_same_answer(tiny_server):
    client = await Client.open(tiny_server.url)
    config = {"temperature": 0, "max_new_tokens": 15}
    structured = await run_to_done(client, {"type": "inference", "config": config,
                                            "prompt": {"system": "Be brief.", "user": "Name a colour."}})
    legacy = await run_to_done(client, {"type": "inference", "config": config,
                                        "prompt": "<|system|>Be brief.<|end|><|user|>Name a colour.<|end|>"})
    turns = await run_to_done(client, {"type": "inference", "config": config, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]})
    assert structured[0]["tokens_in"] == legacy[0]["tokens_in"] == turns[0]["tokens_in"]
    assert text_of(structured) == text_of(legacy) == text_of(turns) != ""
    alone = await run_to_done(client, {"type": "inference", "config": config, "messages": [
        {"role": "user", "content": "Name a colour."}]})
    longer = await run_to_done(client, {"type": "inference", "config": config, "messages": [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"}]})
    assert longer[0]["tokens_in"] > alone[0]["tokens_in"] + 5 and longer[-1]["type"] == "done"  # every turn counts
    await client.close()


async def test_client_request_id_is_echoed(tiny_server):
    client = await Client.open(tiny_server.url)
    messages = await run_to_done(client, inference(max_new_tokens=3, request_id="my-req.1"))
    assert {m["request_id"] for m in messages} == {"my-req.1"}
    await client.close()


async def test_config_is_validated_merged_and_applied(tiny_server):
    client = await Client.open(tiny_server.url)
    ack = await client.request({"type": "config", "data": {"temperature": 0.9, "max_new_tokens": 7}})
    assert ack["type"] == "config_ack"
    assert ack["config"] == {**DEFAULTS["generation_defaults"], "max_new_tokens": 7, "temperature": 0.9}
    refused = await client.request({"type": "config", "data": {"temperature": -1, "top_k": 3}})
    assert refused["type"] == "error" and "temperature" in refused["message"]
    refused = await client.request({"type": "config", "data": {"beam_width": 3}})
    assert refused["type"] == "error" and "beam_width" in refused["message"]
    ack = await client.request({"type": "config", "data": {"do_sample": False}})
    assert ack["config"]["top_k"] == 50 and ack["config"]["max_new_tokens"] == 7  # nothing refused was applied
    messages = await run_to_done(client, {"type": "inference", "prompt": {"user": "hi"}})
    assert messages[0]["max_tokens"] == 7 and messages[-1]["total_tokens"] == 7
    await client.close()


async def test_greedy_is_deterministic_and_sampling_honours_settings(tiny_server):
    client = await Client.open(tiny_server.url)
    first = text_of(await run_to_done(client, inference("abc", max_new_tokens=20)))
    again = text_of(await run_to_done(client, inference("abc", max_new_tokens=20, do_sample=True)))
    assert first == again  # temperature 0 means greedy even with do_sample
    sampled = [text_of(await run_to_done(client, inference("abc", max_new_tokens=20, temperature=1.5, top_k=0,
                                                           top_p=1.0))) for _ in range(3)]
    assert len(set(sampled + [first])) > 1
    only_the_likeliest = text_of(await run_to_done(client, inference("abc", max_new_tokens=20, temperature=1.5,
                                                                     top_k=1, top_p=1.0)))
    assert only_the_likeliest == first  # top_k 1 leaves sampling one token to pick: the greedy one
    await client.close()


@pytest.mark.parametrize("frame, words", [
    ("not json", "Invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"type": "inference", "prompt": {"user": "x"}, "config": {"temperature": NaN}}', "NaN"),
    ('{"type": "launch_missiles"}', "Unknown message type"),
    ('{"type": 7}', "type"),
    ('{"type": "inference"}', "prompt or messages"),
    ('{"type": "inference", "prompt": {"user": ""}}', "prompt.user"),
    ('{"type": "inference", "prompt": {"user": "x", "extra": 1}}', "extra"),
    ('{"type": "inference", "prompt": 5}', "prompt"),
    ('{"type": "inference", "messages": [{"role": "wizard", "content": "x"}]}', "role"),
    ('{"type": "inference", "prompt": "x", "config": {"top_p": 5}}', "top_p"),
    ('{"type": "inference", "prompt": "x", "request_id": "../../x"}', "request_id"),
    ('{"type": "ack", "please": true}', "please"),
    ('{"type": "config", "data": [1]}', "data"),
])
async def test_bad_frames_get_an_error_and_the_connection_stays_open(tiny_server, frame, words):
    reply = await refused_frame(tiny_server.url, frame)
    assert words in reply["message"]
    assert "seq" not in reply and "request_id" not in reply


async def test_binary_frame_is_refused(tiny_server):
    assert "Binary" in (await refused_frame(tiny_server.url, b"\x00\x01"))["message"]


async def test_first_frame_with_a_type_is_an_implicit_hello(tiny_server):
    async with connect(tiny_server.url) as websocket:
        await websocket.send(json.dumps(inference(max_new_tokens=2)))
        welcome = json.loads(await websocket.recv())
        assert welcome["type"] == "welcome"
        assert json.loads(await websocket.recv())["type"] == "start"


async def test_resources_and_models_list(tiny_server):
    client = await Client.open(tiny_server.url)
    resources = await client.request({"type": "get_resources"})
    assert resources["type"] == "resources" and (resources["cuda"] is None) == (not torch.cuda.is_available())
    assert resources["cpu"]["cores"] >= 1 and resources["cpu"]["process_rss_gb"] > 0
    assert resources["model"]["name"] == "tiny-llama" and resources["model"]["vision"] is False
    assert resources["available_models"] == []  # the tiny model lives outside this project's model folders
    listed = await client.request({"type": "list_models"})
    assert listed == {"type": "models_list", "models": []}
    await client.close()


async def test_context_too_long_is_refused_before_work_and_overflow_is_clamped(tiny_server):
    client = await Client.open(tiny_server.url)
    messages = await run_to_done(client, inference("word " * 5000))
    assert messages[-1]["type"] == "error" and len(messages) == 1
    error = messages[0]
    assert error["max_context"] == TINY_MAX_POSITIONS and error["input_length"] > TINY_MAX_POSITIONS
    assert error["message"] == (f"Context too long ({error['input_length']} tokens). Max: {TINY_MAX_POSITIONS}. "
                                "Please retry with shorter input.")
    messages = await run_to_done(client, inference("word " * 4000, max_new_tokens=500))
    assert messages[0]["max_tokens"] == TINY_MAX_POSITIONS - messages[0]["tokens_in"]
    assert messages[-1]["total_tokens"] == messages[0]["max_tokens"]
    await client.close()


async def test_a_prompt_of_exactly_max_context_tokens_is_refused(tiny_server):
    """A prompt must leave room for one token: max_context tokens in is "Context too long" before any work;
    one fewer is answered with the one token left."""
    client = await Client.open(tiny_server.url)
    max_context = client.welcome["capabilities"]["max_context"]
    overhead = (await run_to_done(client, inference("word", max_new_tokens=1)))[0]["tokens_in"] - 1

    def prompt_of(tokens: int) -> dict:  # " word" is one token of this tokenizer
        return inference(" ".join(["word"] * (tokens - overhead)), max_new_tokens=5)

    fits = await run_to_done(client, prompt_of(max_context - 1))
    assert fits[0]["type"] == "start" and fits[0]["tokens_in"] == max_context - 1 and fits[0]["max_tokens"] == 1
    assert fits[-1]["type"] == "done" and fits[-1]["total_tokens"] == 1
    refused = await run_to_done(client, prompt_of(max_context))
    assert len(refused) == 1 and refused[0]["type"] == "error", refused[:2]
    assert refused[0]["input_length"] == max_context and refused[0]["message"].startswith("Context too long")
    await client.close()


async def test_cancel_ends_the_running_stream(tiny_server):
    client = await Client.open(tiny_server.url)
    await client.send(inference(max_new_tokens=4000, request_id="long"))
    assert (await client.recv())["type"] == "start"
    await client.send({"type": "cancel"})
    rest = await client.until("done")
    cancelled = [m for m in rest if m["type"] == "cancelled"]
    assert cancelled == [{"type": "cancelled", "request_id": "long"}]
    assert rest[-1]["finish_reason"] == "cancelled" and rest[-1]["total_tokens"] < 4000
    nothing = await client.request({"type": "cancel", "request_id": "long"})
    assert nothing["type"] == "error" and "long" in nothing["message"]
    await client.close()


async def test_a_bare_cancel_stops_the_oldest_request_and_a_newer_one_goes_on(tiny_server):
    """`cancel` without a request_id stops the session's running (or oldest queued) request, not the one
    sent last: that one goes on until it is cancelled by its id."""
    client = await Client.open(tiny_server.url)
    await client.send(inference(max_new_tokens=4000, request_id="older"))
    await client.until("start")
    await client.send(inference(max_new_tokens=4000, request_id="newer"))
    while (await client.recv()).get("request_id") != "newer":  # queued or started: the session holds it
        pass
    await client.send({"type": "cancel"})
    assert (await client.until("cancelled"))[-1] == {"type": "cancelled", "request_id": "older"}
    received = []
    while not (received and received[-1]["type"] == "done" and received[-1]["request_id"] == "older"):
        received.append(await client.recv())
    assert received[-1]["finish_reason"] == "cancelled"
    assert not [m for m in received if m["type"] == "done" and m["request_id"] == "newer"]  # it goes on
    await client.send({"type": "cancel", "request_id": "older"})
    assert "No request older to cancel" in (await client.until("error"))[-1]["message"]  # it is gone
    await client.send({"type": "cancel", "request_id": "newer"})
    rest = await client.until("done")
    assert {"type": "cancelled", "request_id": "newer"} in rest
    assert rest[-1]["request_id"] == "newer" and rest[-1]["finish_reason"] == "cancelled"
    await client.close()


async def test_ack_deletes_the_buffer(tiny_server):
    client = await Client.open(tiny_server.url)
    first = await run_to_done(client, inference(max_new_tokens=3))
    buffer = tiny_server.sessions_dir / client.session_id / "buffer.jsonl"
    assert buffer.exists()
    assert await client.request({"type": "ack"}) == {"type": "ack_received"}
    assert not buffer.exists()
    messages = await run_to_done(client, inference(max_new_tokens=2))
    assert messages[0]["seq"] == first[-1]["seq"] + 1  # seq keeps rising across an ack
    await client.close()


async def test_many_requests_in_a_row_keep_seq_contiguous(tiny_server):
    client = await Client.open(tiny_server.url)
    for index in range(3):
        await client.send(inference(max_new_tokens=4, request_id=f"r{index}"))
    received = []
    for _ in range(3):
        received += await client.until("done")
    stream = [m for m in received if "seq" in m]
    assert [m["seq"] for m in stream] == list(range(stream[0]["seq"], stream[0]["seq"] + len(stream)))
    assert [m["request_id"] for m in stream if m["type"] == "done"] == ["r0", "r1", "r2"]
    await client.close()
