"""The batching worker, on by default (optimization.max_batch_size "auto"): many requests at once, whatever
their settings, in arrival order, with everything else as with one worker."""
import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import BLOCKER, Client, inference, text_of

from llmws_server.engines.transformers.batching import PAGE_SIZE, SLOT_TOKENS, cache_pages

PROMPTS = ["Tell me about rivers", "A long story", "Name a colour", "Why is the sky blue?", "Count to ten",
           "What is a dragon?"]
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


def test_the_kv_cache_holds_slot_tokens_a_slot_and_one_full_context_unless_memory_is_short():
    assert cache_pages(8, 8192, 300_000) == 8 * SLOT_TOKENS // PAGE_SIZE
    assert cache_pages(2, 8192, None) == 8192 // PAGE_SIZE  # one request may always use the whole context
    assert cache_pages(8, 1024, None) == 8 * 1024 // PAGE_SIZE  # a short context: no slot needs more
    assert cache_pages(8, 90931, 90931) == -(-90931 // PAGE_SIZE)  # a big model on a small GPU: what fits


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_solo_runs_take_turns_on_one_warm_thread_which_on_a_cpu_ends_when_the_batch_takes_over(tiny_model,
                                                                                                 device):
    """A request alone in the batch runs plain generate() on the batch's solo thread, the same one each
    time (a fresh thread costs the first token; on CUDA it rebuilds cuDNN's per-thread attention plans at
    every step: 3x slower on an H100). On a CPU that thread ends when the batch takes over from a solo run
    (a live thread that has run torch keeps an OpenMP pool, which slows the batch's own), and the next
    solo run has a new one; the batch's own thread (transformers' generation loop) ends while the batch is
    empty, so no solo run shares the cores with it. On CUDA both stay. In-process, on the real engine and
    batch; "cuda" here is the engine's device name only, which picks the policy."""
    import threading

    def batch_threads():
        """The live generation-loop threads (on a CPU, once the last one has ended)."""
        found = [thread for thread in threading.enumerate() if "_run_generation_loop" in thread.name]
        for thread in found:
            thread.join(10 if device == "cpu" else 0)
        return [thread for thread in found if thread.is_alive()]

    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.transformers.engine import Engine

    config = load_config(Path(__file__).parents[1] / "config.json")
    engine = Engine.for_config(tiny_model, config)
    engine.device = "cuda:0" if device == "cuda" else engine.device
    threads, generate = [], engine.generate

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return generate(*args, **kwargs)
    engine.generate = recording
    batch = engine.open_batch(2)
    settings = GenerationSettings(max_new_tokens=40, do_sample=False, temperature=1.0, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0)

    def finish(*requests):
        done = set()
        while len(done) < len(requests):
            done |= {p.request for p in batch.progress(timeout=5) if p.finished}
        assert done == set(requests)
    try:
        assert len(batch_threads()) == (device == "cuda")  # on a CPU it ended after the warm-up
        for prompt in ("one", "two", "three"):
            finish(batch.add(engine.encode_text(prompt), 5, settings))
        assert len(threads) == 4 and len(set(threads)) == 1 and threads[0] is not threading.main_thread()
        solo = threads[0]
        assert len(batch_threads()) == (device == "cuda")
        finish(batch.add(engine.encode_text("four"), 40, settings), batch.add(engine.encode_text("five"), 40, settings))
        solo.join(10 if device == "cpu" else 0)
        assert solo.is_alive() == (device == "cuda")  # on a CPU it ended when the batch took over
        assert len(batch_threads()) == (device == "cuda")  # and the batch's when it was empty again
        finish(batch.add(engine.encode_text("six"), 5, settings))
        assert (threads[-1] is solo) == (device == "cuda") and threads[-1].is_alive()
        finish(batch.add(engine.encode_text("seven"), 40, settings),
               batch.add(engine.encode_text("eight"), 40, settings))
        assert len(batch_threads()) == (device == "cuda")  # a second time: it starts again and ends again
    finally:
        batch.close()


def test_a_batch_s_thread_ends_at_once_when_the_batch_empties(tiny_model):
    """On a CPU the batch's thread ends while the batch is empty, and the next request that joins waits
    for that end: it must come at once, not at the idle loop's next wake-up (a 0.1 s timeout, made 30 s
    here, so that only a wake-up ends the wait)."""
    import threading

    from llmws_server.config import load_config
    from llmws_server.engines.transformers.engine import Engine

    engine = Engine.for_config(tiny_model, load_config(Path(__file__).parents[1] / "config.json"))
    if engine.device.startswith("cuda"):
        pytest.skip("on CUDA the batch's thread stays")
    batch = engine.open_batch(2)

    asleep = threading.Event()

    class Drowsy(threading.Event):
        def wait(self, timeout=None):
            asleep.set()
            return super().wait(30)
    try:
        assert batch.parked
        batch.manager._wake_up_loop = Drowsy()
        with batch.lock:
            batch._unpark()
        thread = batch.manager._generation_thread
        assert asleep.wait(30)  # the idle loop sleeps
        with batch.lock:
            batch._park()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        batch.close()


GREEDY_12 = dict(max_new_tokens=12, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


def holding_the_solo_run(engine, after_first_token: bool):
    """engine.generate made to wait for the returned gate, before it starts or after its first token
    (`first` is set then), as a long prompt or a slow step holds it while others join."""
    import threading

    gate, first, generate = threading.Event(), threading.Event(), engine.generate

    def held(prompt, settings, max_tokens, on_text, should_stop, stream, picker=None):
        def asking():
            if stream.ids and not first.is_set():
                first.set()
                gate.wait(30)
            return should_stop()
        if not after_first_token:
            gate.wait(30)
        return generate(prompt, settings, max_tokens, on_text, asking if after_first_token else should_stop, stream,
                        picker)
    engine.generate = held
    return gate, first


@pytest.mark.parametrize("joining", ["while it reads its prompt", "after its first token"])
def test_requests_that_join_a_solo_run_enter_the_batch_in_one_go(tiny_model, joining):
    """Requests that arrive while one runs alone do not block the worker: they wait in the batch, and when
    the solo run stops they are handed to the batch at once, in arrival order, so that the next step reads
    their prompts (four short ones: all). A solo run still reading its prompt stops within a layer and
    enters first, with them; one with a token goes on (reading its prompt and token again) in the step
    after theirs, handed on by the batch's own thread once their step is chosen, so their first tokens do
    not wait for it. Greedy texts are those each gets alone. In-process, on the real engine and batch."""
    import threading

    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.transformers.engine import Engine

    config = load_config(Path(__file__).parents[1] / "config.json")
    engine = Engine.for_config(tiny_model, config)
    greedy = GenerationSettings(**GREEDY_12)
    alone = engine.open_batch(4)
    try:  # greedy: each text is the one it gets on its own
        expected = [text_alone(alone, engine.encode_text(prompt), greedy) for prompt in PROMPTS[:4]]
    finally:
        alone.close()
    batch = engine.open_batch(4)
    handed, generate = [], engine.generate

    def recording(ids, request_id, **kwargs):
        handed.append((request_id, threading.current_thread().name))
        return add_request(ids, request_id=request_id, **kwargs)
    add_request, batch.manager.add_request = batch.manager.add_request, recording
    reading = joining == "while it reads its prompt"
    gate, first = holding_the_solo_run(engine, after_first_token=not reading)
    try:
        names = [batch.add(engine.encode_text(PROMPTS[0]), 12, greedy)]
        assert reading or first.wait(30)
        names += [batch.add(engine.encode_text(prompt), 12, greedy) for prompt in PROMPTS[1:4]]
        assert handed == []  # every add returned while the solo run was held: none waited for it
        gate.set()
        finished, texts, order = set(), dict.fromkeys(names, ""), []
        while len(finished) < len(names):
            for progress in batch.progress(timeout=10):
                assert progress.error is None
                texts[progress.request] += progress.text
                order.append(progress.request)
                if progress.finished:
                    assert progress.tokens == 12
                    finished.add(progress.request)
        threads = [thread for _, thread in handed]
        if reading:  # all four from the solo run's thread, in arrival order, and one step gives each its first token
            assert [name for name, _ in handed] == names and set(threads) == {threads[0]}
            assert threads[0].startswith("llmws-solo") and set(order[:4]) == set(names)
        else:  # the joiners in order, then the continuation from the batch's thread
            assert [name for name, _ in handed] == names[1:] + names[:1]
            assert set(threads[:-1]) == {threads[0]} and threads[0].startswith("llmws-solo")
            assert "_run_generation_loop" in threads[-1]
            # the solo run's tokens (generate() may have made its next one while held), then every
            # joiner's first before the continuation's next
            joined = min(order.index(name) for name in names[1:])
            assert set(order[:joined]) == {names[0]}
            assert set(order[joined:order.index(names[0], joined)]) == set(names[1:])
        assert [texts[name] for name in names] == expected
    finally:
        engine.generate = generate
        batch.close()


def test_a_held_continuation_still_runs_when_the_joiners_are_cancelled_before_their_step(tiny_model):
    """A solo run's continuation waits for the joiners' step to be chosen; if they are all cancelled
    before it comes, the cancel hands the continuation on, and it ends with its full text. In-process: the
    solo run is held after its first token while two join, and the batch's step hook is made to miss the
    joiners' step."""
    import threading

    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.transformers.engine import Engine

    config = load_config(Path(__file__).parents[1] / "config.json")
    engine = Engine.for_config(tiny_model, config)
    greedy = GenerationSettings(**GREEDY_12)
    alone = engine.open_batch(4)
    try:
        expected = text_alone(alone, engine.encode_text(PROMPTS[0]), greedy)
    finally:
        alone.close()
    batch = engine.open_batch(4)
    sampler = batch.manager.logit_processor.logits_processor[0]
    release, missed, cancelled = sampler.before_next_step, threading.Event(), threading.Event()

    def missing_the_first():
        if not missed.is_set():
            missed.set()
            cancelled.wait(30)
        else:
            release()
    generate = engine.generate
    gate, first = holding_the_solo_run(engine, after_first_token=True)
    sampler.before_next_step = missing_the_first
    try:
        names = [batch.add(engine.encode_text(PROMPTS[0]), 12, greedy)]
        assert first.wait(30)
        names += [batch.add(engine.encode_text(prompt), 12, greedy) for prompt in PROMPTS[1:3]]
        gate.set()
        assert missed.wait(30)
        for name in names[1:]:
            batch.cancel(name)
        cancelled.set()
        text, finished = "", []
        while not finished:
            progress = batch.progress(timeout=10)
            assert progress or batch.held == [], "the continuation was left held"
            text += "".join(item.text for item in progress if item.request == names[0])
            finished = [item for item in progress if item.request == names[0] and item.finished]
        assert finished[0].tokens == 12 and text == expected
    finally:
        engine.generate = generate
        batch.close()


def test_a_stop_while_a_prompt_is_read_takes_effect_within_a_layer(tiny_model):
    """generate() asks should_stop before each decoder layer while it reads the prompt (a cancel during a
    long prompt's read, a batch taking over a solo run): stopped at the second layer, one layer ran and no
    token came. The layers' hooks go with the call: the next generate() runs in full."""
    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.transformers.engine import Engine

    config = load_config(Path(__file__).parents[1] / "config.json")
    engine = Engine.for_config(tiny_model, config)
    assert len(engine.layers) >= 2
    ran, texts, asks = [], [], iter([None])

    def keep(text, logprobs):
        texts.append(text)
    hooks = [layer.register_forward_hook(lambda module, args, output: ran.append(module)) for layer in engine.layers]
    try:
        greedy = GenerationSettings(**GREEDY_12)
        result = engine.generate(engine.encode_text(PROMPTS[1]), greedy, 12, keep,
                                 lambda: next(asks, "cancelled"))
        assert (result, texts, ran) == ((0, "cancelled"), [], engine.layers[:1])
        assert engine.generate(engine.encode_text(PROMPTS[1]), greedy, 12, keep, lambda: None) == (12, "length")
    finally:
        for hook in hooks:
            hook.remove()


def text_alone(batch, prompt, settings) -> str:
    request = batch.add(prompt, settings.max_new_tokens, settings)
    text, progress = "", []
    while not (progress and progress[-1].finished):
        progress = batch.progress(timeout=10)
        text += "".join(item.text for item in progress if item.request == request)
    return text


def test_a_model_that_its_batch_froze_for_the_garbage_collector_is_freed_when_it_is_unloaded(tiny_model):
    """The batch freezes what lives with the model (gc.freeze: a full collection skips it, and each time
    the batch's thread ends there is one); a model switch must still free the old model."""
    import gc
    import weakref

    from llmws_server.config import load_config
    from llmws_server.engines.transformers.engine import Engine

    engine = Engine.for_config(tiny_model, load_config(Path(__file__).parents[1] / "config.json"))
    batch = engine.open_batch(2)
    model = weakref.ref(engine.model)
    batch.close()
    del batch
    engine.unload()
    try:
        assert model() is None
    finally:
        gc.unfreeze()
