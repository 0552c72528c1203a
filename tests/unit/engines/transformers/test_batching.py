"""engines/transformers/batching.py in-process, on the real engine and the tiny random model (no server): the KV
cache's size, the solo run's and the batch's threads, requests that join a solo run, and the model freed when a
batch froze it for the garbage collector, and a request right after a solo run's end running alone too."""
import pytest
from conftest import PROMPTS, REPO

from llmws_server.engines.transformers.batching import PAGE_SIZE, SLOT_TOKENS, cache_pages

from .shared import GREEDY_12


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

    config = load_config(REPO / "config.json")
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

    engine = Engine.for_config(tiny_model, load_config(REPO / "config.json"))
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

    config = load_config(REPO / "config.json")
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

    config = load_config(REPO / "config.json")
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


def test_a_request_right_after_a_solo_run_runs_alone_too(tiny_model):
    """A solo run's end, once handed on, lets the next request run alone (plain generate()), not in a
    batch of one (slower: the paged cache and a scheduled step for one row), even when the run's thread
    has not yet put its last word on the queue: the worker read the end first, the batch still held the
    run, and a constrained answer right after another ran at about half its speed. The test holds the
    run's thread back (its settle) until the end has been read, the order that lost the race."""
    import threading

    from llmws_server.config import GenerationSettings, load_config
    from llmws_server.engines.api import Prompt
    from llmws_server.engines.transformers.engine import Engine

    engine = Engine.for_config(tiny_model, load_config(REPO / "config.json"))
    alone, generate = [], engine.generate

    def recording(*args, **kwargs):
        alone.append(args[0].ids)
        return generate(*args, **kwargs)
    engine.generate = recording
    batch = engine.open_batch(2)
    end_read, settle = threading.Event(), batch.settle

    def settle_after_the_end_is_read(*args):
        assert end_read.wait(30)
        settle(*args)
    batch.settle = settle_after_the_end_is_read
    settings = GenerationSettings(**{**GREEDY_12, "max_new_tokens": 6})
    try:
        first = batch.add(Prompt([1, 2, 3]), 6, settings)
        while not any(p.finished and p.request == first for p in batch.progress(timeout=5)):
            pass
        end_read.set()
        second = batch.add(Prompt([4, 5, 6]), 6, settings)
        while not any(p.finished and p.request == second for p in batch.progress(timeout=5)):
            pass
        assert alone[-2:] == [[1, 2, 3], [4, 5, 6]]  # both ran alone
    finally:
        end_read.set()
        batch.close()


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

    engine = Engine.for_config(tiny_model, load_config(REPO / "config.json"))
    batch = engine.open_batch(2)
    model = weakref.ref(engine.model)
    batch.close()
    del batch
    engine.unload()
    try:
        assert model() is None
    finally:
        gc.unfreeze()
