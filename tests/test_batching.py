"""The batching worker, on by default (optimization.max_batch_size "auto"): many requests at once, whatever
their settings, in arrival order, with everything else as with one worker."""
import asyncio
import json
import re
import shutil

import pytest
from conftest import BLOCKER, PROMPTS, Client, inference, text_of

SLOTS = 4


@pytest.fixture(scope="module")
def batch_server(start_server, tiny_model):
    """The shipped settings but float32 (as alone_server; the tiny model has no generation_config.json, so
    requests get the built-in defaults: sampled at 0.7, no penalty)."""
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny-a")
        shutil.copytree(tiny_model, root / "models" / "tiny-b")
    return start_server(None, populate, optimization={"dtype": "float32"})


@pytest.fixture(scope="module")
def alone_server(start_server, tiny_model):
    """One request at a time (max_batch_size 1), in float32 like batch_server: the texts must be equal to the
    token, and in bfloat16 on a GPU batched and single kernels round differently."""
    return start_server(tiny_model, optimization={"dtype": "float32", "max_batch_size": 1})


async def together(server, messages):
    """Send every message at once from its own client. Returns each client's messages, and every message as
    (client, message) in the order they arrived across clients."""
    clients = [await Client.open(server.url) for _ in messages]
    for client, message in zip(clients, messages):
        await client.send(message)
    events = []

    async def follow(index, client):
        received = []
        while not received or received[-1]["type"] not in ("done", "error"):
            received.append(await client.recv(timeout=120))
            events.append((index, received[-1]))
        return received

    results = await asyncio.gather(*(follow(index, client) for index, client in enumerate(clients)))
    for client in clients:
        await client.close()
    return results, events


def generated_together(events, streams: int) -> bool:
    """Every stream started before any had half of its tokens: they generated at the same time (one after
    the other, the second would start only after the first's last token)."""
    totals = [0] * streams
    for index, message in events:
        totals[index] += message["type"] == "token"
    seen, started = [0] * streams, set()
    for index, message in events:
        if message["type"] == "start":
            started.add(index)
        elif message["type"] == "token":
            seen[index] += 1
            if seen[index] > totals[index] / 2 and len(started) < streams:
                return False
    return len(started) == streams


async def answers(server, prompts, max_new_tokens=40, **config):
    results, _ = await together(server, [inference(prompt, max_new_tokens, **config) for prompt in prompts])
    return results


async def answers_alone(server, prompts, max_new_tokens=40, **config):
    return [text_of((await answers(server, [prompt], max_new_tokens, **config))[0]) for prompt in prompts]


async def test_mixed_settings_share_one_batch_and_each_keeps_its_own(batch_server, alone_server):
    """Greedy, sampled and penalised requests generate together, none queued; the greedy ones, penalised or
    not, write exactly what they write alone."""
    greedy = [{}, {"repetition_penalty": 1.1}, {}, {"repetition_penalty": 1.3}]
    sampled = [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1}]
    messages = [inference(PROMPTS[i], 40, **config) for i, config in enumerate(greedy)]
    messages += [inference(PROMPTS[4 + i], 40, **config) for i, config in enumerate(sampled)]
    results, events = await together(batch_server, messages)
    assert generated_together(events, len(messages))
    assert not [m for m in sum(results, []) if m["type"] == "queued"]
    assert all(messages[-1]["type"] == "done" and messages[-1]["total_tokens"] == 40 for messages in results)
    for index, config in enumerate(greedy):
        [alone] = await answers_alone(alone_server, [PROMPTS[index]], 40, **config)
        assert text_of(results[index]) == alone, config


async def test_a_request_that_began_alone_goes_on_in_the_batch_without_a_seam(batch_server, alone_server):
    """A request with the batch to itself runs as plain generate(); when a second joins mid-answer, the
    first goes on in the batch from its tokens so far: same text as alone, to the token, and the same
    count, greedy or penalised, while the two generate together."""
    for config in ({}, {"repetition_penalty": 1.3}):
        first, second = await Client.open(batch_server.url), await Client.open(batch_server.url)
        await first.send(inference(PROMPTS[1], 400, **config))
        before = await first.until("token")
        while len([m for m in before if m["type"] == "token"]) < 20:
            before.append(await first.recv())
        await second.send(inference(PROMPTS[2], 40, **config))
        ended = []

        async def until_done(client):
            messages = await client.until("done")
            ended.append(client)
            return messages

        after, joined = await asyncio.gather(until_done(first), until_done(second))
        assert joined[0]["type"] == "start" and ended == [second, first]  # it joined at once, ended first
        assert not [m for m in before + after + joined if m["type"] == "queued"]
        assert text_of(before + after) == (await answers_alone(alone_server, [PROMPTS[1]], 400, **config))[0]
        assert after[-1]["total_tokens"] == 400, config
        assert text_of(joined) == (await answers_alone(alone_server, [PROMPTS[2]], 40, **config))[0]
        await first.close()
        await second.close()


async def test_a_penalty_changes_the_text_in_a_batch_as_it_does_alone(batch_server, alone_server):
    # Each beside a companion, so that both generate in the batch (a request alone runs as plain generate())
    plain, _ = await answers(batch_server, [PROMPTS[0], PROMPTS[1]], 60)
    penalised, _ = await answers(batch_server, [PROMPTS[0], PROMPTS[1]], 60, repetition_penalty=1.5)
    assert text_of(penalised) != text_of(plain)
    assert text_of(penalised) == (await answers_alone(alone_server, [PROMPTS[0]], 60, repetition_penalty=1.5))[0]


async def test_a_request_s_own_settings_win_over_the_model_s_both_batched_and_alone(start_server, tiny_model):
    """The model recommends a penalty (generation_config.json); a request that says 1.0 gets none, batched
    or alone, and one that says nothing gets the model's."""
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny")
        (root / "models" / "tiny" / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.5}))
    servers = [start_server(None, populate, optimization={"dtype": "float32", "max_batch_size": size})
               for size in (1, 4)]
    texts = {}
    for server in servers:
        for penalty in (None, 1.0):
            config = {} if penalty is None else {"repetition_penalty": penalty}
            messages, _ = await answers(server, [PROMPTS[0], PROMPTS[1]], 60, **config)  # batched: beside another
            texts[server.port, penalty] = text_of(messages)
    alone, batched = (server.port for server in servers)
    assert texts[alone, None] == texts[batched, None] != texts[alone, 1.0] == texts[batched, 1.0]


async def test_a_prompt_longer_than_one_batching_step_gives_the_same_text(batch_server, alone_server):
    # Over a step's tokens (engines.transformers.batching.STEP_TOKENS), the prompt is prefilled in pieces while the
    # others decode.
    prompts = [" ".join(["river stone"] * 400), *PROMPTS[:3]]
    alone = await answers_alone(alone_server, prompts)
    results = await answers(batch_server, prompts)
    assert next(m for m in results[0] if m["type"] == "start")["tokens_in"] > 512
    assert [text_of(messages) for messages in results] == alone


async def test_requests_start_in_arrival_order_and_the_fifth_waits_for_a_slot(start_server, tiny_model):
    server = start_server(tiny_model, optimization={"max_batch_size": SLOTS})
    clients = [await Client.open(server.url) for _ in PROMPTS]
    for index, client in enumerate(clients):
        await client.send(inference(PROMPTS[index], max_new_tokens=300))
    events = []

    async def follow(index, client):
        while True:  # message by message, so `events` is in arrival order across clients
            message = await client.recv()
            events.append((message["type"], index))
            if message["type"] == "done":
                assert message["total_tokens"] == 300
                return

    await asyncio.gather(*(follow(index, client) for index, client in enumerate(clients)))
    starts = [index for kind, index in events if kind == "start"]
    assert starts == list(range(len(PROMPTS)))  # in arrival order
    first_done = events.index(next(event for event in events if event[0] == "done"))
    assert set(starts[:SLOTS]) <= {index for kind, index in events[:first_done] if kind == "start"}  # together
    # The fifth waited for a slot to free: it started only when a first request was (nearly) through its 300
    # tokens. Messages of different sockets may arrive a few apart, so "nearly", not "after its done".
    def pieces(first, upto=len(events)):
        return sum(1 for kind, index in events[:upto] if kind == "token" and index == first)
    fifth_start = events.index(("start", SLOTS))
    assert max(pieces(first, fifth_start) / pieces(first) for first in range(SLOTS)) > 0.9
    assert ("queued", SLOTS) in events
    for client in clients:
        await client.close()


async def test_a_cancel_stops_only_that_request_and_a_resume_mid_batch_is_exact(batch_server):
    keeper, canceller = await Client.open(batch_server.url), await Client.open(batch_server.url)
    await keeper.send(inference("keep going", max_new_tokens=200))
    await canceller.send(BLOCKER)
    await canceller.until("token")
    await canceller.send({"type": "cancel"})
    done = (await canceller.until("done"))[-1]
    assert done["finish_reason"] == "cancelled" and done["total_tokens"] < 4000
    received = [await keeper.recv() for _ in range(5)]
    await keeper.ws.close()
    back = await Client.open(batch_server.url, {"session_id": keeper.session_id, "last_seq": received[-1]["seq"]})
    received += await back.until("done")
    whole = await answers(batch_server, ["keep going"], max_new_tokens=200)
    assert text_of(received) == text_of(whole[0]) and received[-1]["total_tokens"] == 200
    await back.close()
    await canceller.close()


async def test_sampled_requests_with_different_settings_share_a_batch_and_keep_their_own(batch_server, alone_server):
    # top_k 1 leaves only the most likely token, so that request must give the greedy text even though it
    # samples beside one at temperature 1.5 with every token allowed.
    [greedy] = await answers_alone(alone_server, ["Name a colour"], max_new_tokens=60)
    wild, narrow = await Client.open(batch_server.url), await Client.open(batch_server.url)
    await wild.send(inference("A long story", max_new_tokens=400, temperature=1.5, do_sample=True, top_k=0, top_p=1.0))
    await wild.until("start")
    await narrow.send(inference("Name a colour", max_new_tokens=60, temperature=1.0, do_sample=True, top_k=1,
                                top_p=1.0))
    assert (await narrow.recv())["type"] == "start"  # joined at once
    narrow_messages, wild_messages = await narrow.until("done"), await wild.until("done")
    assert text_of(narrow_messages) == greedy
    assert wild_messages[-1]["type"] == "done"  # sampling may draw the end token before 400
    await wild.close()
    await narrow.close()


async def test_a_switch_waits_for_the_batch_to_drain(batch_server):
    worker, switcher = await Client.open(batch_server.url), await Client.open(batch_server.url)
    await worker.send(inference("busy", max_new_tokens=300))
    await worker.until("start")
    await switcher.send({"type": "switch_model", "model_path": "tiny-b"})
    await switcher.send(inference("after the switch", max_new_tokens=3))
    worker_done = (await worker.until("done"))[-1]
    switched = await switcher.until("model_switched")
    assert worker_done["total_tokens"] == 300 and switched[-1]["model"] == "tiny-b"
    assert not [m for m in switched if m["type"] == "start"]  # nothing was admitted during the switch
    assert (await switcher.until("done"))[-1]["total_tokens"] == 3
    await worker.close()
    await switcher.close()


async def test_context_limit_with_batching(batch_server):
    client = await Client.open(batch_server.url)
    await client.send(inference("word " * 5000))
    assert "Context too long" in (await client.until("error"))[-1]["message"]
    await client.send(inference("still fine", max_new_tokens=3))
    assert (await client.until("done"))[-1]["total_tokens"] == 3
    await client.close()


async def test_the_time_limit_holds_in_a_batch(start_server, tiny_model):
    server = start_server(tiny_model, limits={"timeout_token_generation": 0.5})
    clients = [await Client.open(server.url) for _ in range(2)]
    for client in clients:
        await client.send(BLOCKER)
    for client in clients:
        done = (await client.until("done"))[-1]
        assert done["finish_reason"] == "timeout" and done["total_tokens"] < 4000  # on a slow machine maybe 0
        await client.close()


async def test_the_batch_is_opened_at_start_and_after_a_switch_before_any_request(start_server, tiny_model):
    """No first request pays for setting the batch up: it is ready (warmed up) before the server listens for
    long, and again when a switch is done."""
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny-b")
    server = start_server(tiny_model, populate)
    out = await server.wait_for_output("requests ready")
    assert re.search(r'batching up to (\d+) requests at once \(optimization.max_batch_size "auto" on (cpu|cuda)', out)
    client = await Client.open(server.url)
    await client.send({"type": "switch_model", "model_path": "tiny-b"})
    await client.until("model_switched")
    for _ in range(600):
        if server.output().count("requests ready") == 2:
            break
        await asyncio.sleep(0.1)
    assert server.output().count("requests ready") == 2
    assert (await client.until_done(inference("after", 3)))[-1]["total_tokens"] == 3
    await client.close()
