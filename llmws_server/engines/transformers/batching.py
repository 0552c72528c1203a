"""The transformers engine's batch (engines.api.Batch), on transformers' continuous batching
(`model.init_continuous_batching()`): requests join and leave while the others generate, each with its
own settings (sampling.py). It knows nothing about the queue or the sessions: the scheduler
(core/batching.py) adds and cancels requests and reads their progress."""
import gc
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from llmws_server.config import GenerationSettings
from llmws_server.engines.api import Progress, Prompt
from llmws_server.engines.text import TextStream
from llmws_server.engines.transformers.picking import Picker
from llmws_server.engines.transformers.sampling import request_kwargs, request_sampling
from llmws_server.errors import OUT_OF_MEMORY

if TYPE_CHECKING:  # the engine opens its batches: it imports this module
    from llmws_server.engines.transformers.engine import Engine

PAGE_SIZE = 256
# Tokens one batching step may take in (longer prompts are prefilled in pieces, the others decoding
# between them). Not transformers' default of 8192: its float mask of 8192 x (cache + 8192) tokens is
# gigabytes, filled on every new manager. A CPU's step takes time in proportion to its tokens, so there a
# step takes half as many: of requests sent together, the first ones have their first token a step
# sooner, and the ones generating wait less. (Figures: docs/benchmarks.md, "The figures behind the engines' rules".)
STEP_TOKENS = {"cuda": 512, "cpu": 256}
# The KV cache holds this many tokens per slot (one request may use more while the others use less).
SLOT_TOKENS = 2048
WARM_PROMPT = [0, 1, 2, 3]  # token ids for the requests that warm a new batch up
GREEDY = GenerationSettings(max_new_tokens=2, do_sample=False, temperature=1.0, top_p=1.0, top_k=0,
                            repetition_penalty=1.0)
# transformers logs every step of a batch's set-up and shutdown at INFO; the server's own lines say what
# matters (batching.py), and warnings still show.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
log = logging.getLogger("llmws.batch")


def solo_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmws-solo")


def cache_pages(slots: int, max_context: int, kv_token_budget: int | None) -> int:
    """KV pages for the batch: SLOT_TOKENS a slot, and at least one full context, but no more than free
    memory holds. The scheduler shares the pages out as requests grow; when they run short it admits no
    new prompt until some free up."""
    tokens = max(slots * min(max_context, SLOT_TOKENS), max_context)
    if kv_token_budget is not None:
        tokens = max(min(tokens, kv_token_budget), max_context)
    return math.ceil(tokens / PAGE_SIZE)


@dataclass
class Joiner:
    """A request on its way into the batch: the token ids it starts from, and its text stream."""
    name: str
    ids: list[int]
    stream: TextStream
    max_tokens: int
    settings: GenerationSettings


class Solo:
    """The request a batch holds alone generates with plain generate(), which is faster than a batch of
    one (no paged cache, no scheduling per step). When others join, it stops after its current token and
    the batch goes on from there: its prompt and tokens so far are the continuation's prompt, its text
    stream the same, so the text and the count run on without a seam. If they join while it still reads
    its prompt, it stops within a layer and starts in the batch as they do. The joiners wait for that (in
    the batch's `joining`, not blocking the worker) and enter the batch in arrival order, so that the
    next step reads their prompts (as many as it takes); a continuation with tokens enters the step
    after (`settle`). Where a solo run's thread lives is the batch's `on_solo_thread`."""

    def __init__(self, batch: "TransformersBatch", name: str, prompt: Prompt, max_tokens: int,
                 settings: GenerationSettings):
        self.batch, self.name = batch, name
        self.handoff, self.cancelled = threading.Event(), threading.Event()
        self.settled = threading.Event()  # it has finished, or gone on in the batch (set by the batch)
        self.results: queue.Queue = queue.Queue()  # Progress, then None once it is over
        self.over = False
        batch.on_solo_thread(self._run, prompt, max_tokens, settings)

    def _run(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> None:
        stream = TextStream(self.batch.engine.tokenizer)

        def on_text(text: str, logprobs: tuple = ()) -> None:
            self.results.put(Progress(self.name, text, len(stream.ids), False, logprobs=logprobs))

        def should_stop() -> str | None:
            return "cancelled" if self.cancelled.is_set() else "handoff" if self.handoff.is_set() else None

        continuation = None
        try:
            generated, reason = self.batch.engine.generate(prompt, settings, max_tokens, on_text, should_stop, stream,
                                                           self.batch.pickers.get(self.name))
            ended = reason != "handoff" or generated >= max_tokens or (generated and stream.ids[-1] in self.batch.eos)
            if not ended:
                stream.go_on_in_a_batch()
                continuation = Joiner(self.name, prompt.ids + stream.ids, stream, max_tokens - generated, settings)
            elif reason != "cancelled":
                self.results.put(Progress(self.name, "", generated, True))
        except Exception as exc:
            log.exception("request %s failed", self.name)
            self.results.put(Progress(self.name, "", len(stream.ids), True, self.batch.engine_error(exc)))
        finally:
            if continuation is None:
                self.batch.pickers.pop(self.name, None)
            self.batch.settle(self, continuation)
            self.results.put(None)

    def progress(self, timeout: float) -> list[Progress]:
        """What it produced, waiting at most `timeout` seconds for the first of it."""
        found = []
        try:
            item = self.results.get(timeout=timeout)
            while item is not None:
                found.append(item)
                if item.finished:  # nothing of this run follows; a request added now starts alone
                    break
                item = self.results.get_nowait()
            self.over = True
        except queue.Empty:
            pass
        return found


def one_forward_at_a_time(model: Any) -> list:
    """Hooks that let the batch's thread and a solo run's run the model one at a time. While a forward runs,
    transformers sets `is_causal` on the model's one config (utils.generic.merge_with_config_defaults), and
    the batch's steps pass is_causal=False (they bring their own masks): a solo step that ran meanwhile
    took it for its own and put it back after the batch's step had removed it, so every later solo answer
    was computed with a bidirectional mask, to the end of the process. They overlap when a request leaves
    the batch while the manager is still in a step (its schema complete) and the next starts alone at once."""
    lock = threading.Lock()

    def enter(module: Any, args: tuple) -> None:
        lock.acquire()

    def leave(module: Any, args: tuple, output: Any) -> None:
        lock.release()
    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]


class TransformersBatch:
    def __init__(self, engine: "Engine", slots: int):
        assert engine.model is not None  # a batch is opened on a loaded model
        self.engine, self.model = engine, engine.model
        self.hooks = one_forward_at_a_time(self.model)
        tokenizer = engine.tokenizer
        eos = self.model.generation_config.eos_token_id
        # The batch decodes greedily; a sampled request's token is drawn by the sampler, which needs the
        # steps one after the other (no asynchronous batching, no CUDA graphs).
        generation = GenerationConfig(max_new_tokens=engine.max_context, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, eos_token_id=eos if eos is not None else -1,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        batching = ContinuousBatchingConfig(
            max_requests_per_batch=slots, page_size=PAGE_SIZE, max_batch_tokens=STEP_TOKENS[engine.device_kind],
            num_blocks=cache_pages(slots, engine.max_context, engine.kv_token_budget),
            use_cuda_graph=False, use_async_batching=False)
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=batching)
        self.pickers: dict[str, Picker] = {}  # the requests whose settings are not plain (picking.py)
        self.manager.logit_processor = request_sampling(before_next_step=self._release_held, pickers=self.pickers)
        self.manager.start()
        self.runner: ThreadPoolExecutor | None = solo_thread()  # see on_solo_thread
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.streams: dict[str, TextStream] = {}  # the requests in the manager
        self.solo: Solo | None = None
        self.joining: list[Joiner] = []  # requests that wait for the solo run to go on in the batch
        self.held: list[Joiner] = []  # a solo run's continuation, until the joiners' first step is chosen
        self.lock = threading.Lock()  # a request joins, goes on from its solo run, or is cancelled: one at a time
        # On a CPU only one thread that runs torch lives at a time (see _park); on CUDA both stay, warm
        # (see on_solo_thread).
        self.one_torch_thread = engine.device_kind == "cpu"
        self.parked = False
        self._warm()
        # What lives now (model, tokenizer, libraries) lives as long as the model: a full collection (each
        # park's, in the manager's stop()) skips it from here on. Once per model, not at every reopening
        # (what a request holds then must stay collectable); Engine.free_memory unfreezes it before the
        # model goes.
        if not gc.get_freeze_count():
            gc.freeze()
        with self.lock:
            self._park()

    def _warm(self) -> None:
        """A short request each way, so that the first client's does not pay for the first step's set-up."""
        started = time.monotonic()
        self.manager.add_request(WARM_PROMPT, request_id="warm-up", max_new_tokens=2)
        while self.manager.is_running() and time.monotonic() - started < 60:
            result = self.manager.get_result(timeout=0.1)
            if result is not None and result.is_finished():
                break
        self.on_solo_thread(self.engine.generate, Prompt(WARM_PROMPT), GREEDY, 2, lambda text, logprobs: None,
                            lambda: None).result()

    def on_solo_thread(self, run: Callable[..., Any], *args: Any) -> Future:
        """Run a solo request (plain generate()). Solo runs take turns on one warm thread: a fresh one
        delays a CPU's first token, and on CUDA would build again what is cached per thread (cuDNN's
        plans, where cuDNN's attention is on)."""
        if self.runner is None:
            self.runner = solo_thread()
        return self.runner.submit(run, *args)

    def _batch_takes_over(self) -> None:
        """On a CPU the solo thread ends when the batch takes over from a solo run (the next solo run starts
        a new one): a thread that has run torch keeps an OpenMP pool, and with more pools than cores the
        other pool sleeps between operations instead of spinning (the batch's steps are slower while an idle
        solo thread lives). On CUDA it stays, for its cached plans (lock held)."""
        if self.runner is not None and self.one_torch_thread:
            self.runner.shutdown(wait=False)  # called on that thread: it ends after this run
            self.runner = None

    def _park(self) -> None:
        """On a CPU the batch's thread ends while the batch is empty, for the same reason as the solo
        thread's: while it lives, a solo run is slower and its first token later. The manager keeps its
        cache and starts a new thread when a request enters (lock held)."""
        if self.one_torch_thread and not self.parked:
            self.manager.stop(block=False, keep_for_next_session=True)
            # stop() leaves an idle loop asleep until its next 0.1 s wake-up, which a request that came
            # meanwhile would wait for in _unpark
            self.manager._wake_up_loop.set()
            self.parked = True

    def _unpark(self) -> None:
        if self.parked:
            self.manager.join(time.perf_counter(), timeout=30)
            # stop() put back the model's own attention; the batch may need its paged one
            config = self.manager.continuous_batching_config
            # (transformers types the model as its own protocol, which its model classes do not declare)
            self.manager.switch_to_cb_friendly_attn(self.model, config.auto_switch_to_flash)  # type: ignore[arg-type]
            self.manager.start()
            self.parked = False

    def add(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> str:
        request = uuid.uuid4().hex
        if not settings.plain:  # made before it runs: alone or in the batch, one picker all along
            self.pickers[request] = self.engine.picker(settings)
        with self.lock:
            if self.solo is None and not self.streams:
                self.solo = Solo(self, request, prompt, max_tokens, settings)
                return request
            joiner = Joiner(request, prompt.ids, TextStream(self.engine.tokenizer), max_tokens, settings)
            if self.solo is not None and not self.solo.settled.is_set():
                self.joining.append(joiner)  # the solo run's thread starts it, after the run's continuation
                self.solo.handoff.set()
            else:
                self._start(joiner)
        return request

    def settle(self, solo: Solo, continuation: Joiner | None) -> None:
        """A solo run is over or goes on in the batch (on its thread): the batch takes the requests that
        joined meanwhile, and its continuation. A continuation with tokens reads its prompt and them
        again, so it enters the step after theirs: their first tokens do not wait for it, and it has its
        own first token already. One stopped
        while its prompt was read (engine.generate) has none: it enters first, as it came first."""
        with self.lock:
            if solo.cancelled.is_set():
                continuation = None
            if continuation is not None and not continuation.stream.ids:
                self.joining.insert(0, continuation)
                continuation = None
            for joiner in self.joining:
                self._start(joiner)
            if continuation is not None:
                if self.joining:
                    self.streams[continuation.name] = continuation.stream
                    self.held.append(continuation)
                else:
                    self._start(continuation)
            if self.streams:
                self._batch_takes_over()
            self.joining.clear()
            solo.settled.set()

    def _start(self, joiner: Joiner) -> None:
        self._unpark()
        self.streams[joiner.name] = joiner.stream
        self._add_to_manager(joiner)

    def _add_to_manager(self, joiner: Joiner) -> None:
        self.manager.add_request(joiner.ids, request_id=joiner.name, max_new_tokens=joiner.max_tokens,
                                 streaming=True, **request_kwargs(joiner.settings))

    def _release_held(self) -> None:
        """The held continuation goes into the manager (not cancelled meanwhile): when a step's requests
        are chosen (on the manager's thread), or when a request is cancelled (the joiners may all be gone
        before their step). list.pop is atomic: each is added once."""
        while self.held:
            try:
                joiner = self.held.pop()
            except IndexError:
                return
            if joiner.name in self.streams:
                self._add_to_manager(joiner)

    def cancel(self, request: str) -> None:
        self.pickers.pop(request, None)
        with self.lock:
            if self.solo is not None and self.solo.name == request:
                self.solo.cancelled.set()
            self.joining = [joiner for joiner in self.joining if joiner.name != request]
            if self.streams.pop(request, None) is not None:
                self.manager.cancel_request(request)
                self._release_held()
                self._park_if_empty()

    def progress(self, timeout: float) -> list[Progress]:
        found = []
        solo = self.solo
        if solo is not None:
            found = [item for item in solo.progress(timeout) if not solo.cancelled.is_set()]
            timeout = 0
            if solo.over:
                with self.lock:
                    self.solo = None
        result = self.manager.get_result(timeout=timeout)
        while result is not None:
            stream = self.streams.get(result.request_id)
            if stream is not None:  # not one cancelled meanwhile
                found.append(self._progress(stream, result))
            result = self.manager.get_result(timeout=0)
        if found and not self.streams:
            with self.lock:
                self._park_if_empty()
        return found

    def _park_if_empty(self) -> None:
        if not self.streams and not self.joining and self.solo is None:
            self._park()

    def _progress(self, stream: TextStream, result: Any) -> Progress:
        tokens = list(result.generated_tokens)
        if result.error:
            self.streams.pop(result.request_id, None)
            message = OUT_OF_MEMORY if "out of memory" in result.error.lower() else f"Generation failed: {result.error}"
            return Progress(result.request_id, "", stream.earlier + len(tokens), True, message)
        finished = result.is_finished()
        picker = self.pickers.get(result.request_id)
        if picker is not None and picker.done and not finished:  # its schema is complete: it ends here
            tokens, finished = tokens[:picker.picked], True
            self.manager.cancel_request(result.request_id)
        if finished:
            self.streams.pop(result.request_id, None)
            self.pickers.pop(result.request_id, None)
        text = stream.follow(tokens)
        logprobs = picker.take_logprobs() if picker is not None else ()
        return Progress(result.request_id, text, len(stream.ids), finished, logprobs=logprobs)

    def engine_error(self, exc: BaseException | None) -> str:
        """The message for the requests an engine error ended."""
        return OUT_OF_MEMORY if self.engine.is_out_of_memory(exc) else f"Generation failed: {exc}"

    def failure(self) -> str | None:
        if self.parked or self.manager.is_running():
            return None
        return self.engine_error(getattr(self.manager.background_thread_status, "fatal_error", None))

    def close(self) -> None:
        solo = self.solo
        if solo is not None:
            solo.cancelled.set()
            solo.settled.wait(30)
        if self.runner is not None:
            self.runner.shutdown(wait=False)
        self.manager.stop(block=True, timeout=30, hard_stop=True)  # what still runs is cancelled
        if hasattr(self.model, "destroy_cached_continuous_batching_manager"):
            self.model.destroy_cached_continuous_batching_manager()
        for hook in self.hooks:
            hook.remove()
        self.streams.clear()

