"""The transformers engine's batch (engine_api.Batch), on transformers' continuous batching
(`model.init_continuous_batching()`): requests join and leave while the others generate, each with its
own settings (engine_sampling)."""
import logging
import math
import time
import uuid

from tokenizers.decoders import DecodeStream
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from .engine_api import OOM_MESSAGE, Progress
from .engine_sampling import request_kwargs, request_sampling

PAGE_SIZE = 256
# Tokens one batching step may take in (longer prompts are prefilled in pieces). transformers' default of
# 8192 makes a float mask of 8192 x (cache + 8192) tokens: gigabytes, filled on every new manager.
MAX_BATCH_TOKENS = 512
# The KV cache holds this many tokens per slot (one request may use more while the others use less).
SLOT_TOKENS = 2048
WARM_PROMPT = [0, 1, 2, 3]  # token ids for the request that warms a new batch up
# transformers logs every step of a batch's set-up and shutdown at INFO; the server's own lines say what
# matters (batching.py), and warnings still show.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


def cache_pages(slots: int, max_context: int, kv_token_budget: int | None) -> int:
    """KV pages for the batch: SLOT_TOKENS a slot, and at least one full context, but no more than free
    memory holds. The scheduler shares the pages out as requests grow; when they run short it admits no
    new prompt until some free up."""
    tokens = max(slots * min(max_context, SLOT_TOKENS), max_context)
    if kv_token_budget is not None:
        tokens = max(min(tokens, kv_token_budget), max_context)
    return math.ceil(tokens / PAGE_SIZE)


class TextStream:
    """One request's token ids in, its new text out: incremental decoding (tokenizers' DecodeStream), so a
    step costs the same however long the answer is, and a character split over tokens waits for its rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.tokens = 0

    def text(self, generated: list[int]) -> str:
        """The text of the tokens in `generated` not seen before."""
        new = generated[self.tokens:]
        self.tokens = len(generated)
        return "".join(self.stream.step(self.tokenizer, token) or "" for token in new)


class TransformersBatch:
    def __init__(self, engine, slots: int):
        self.engine = engine
        self.model = engine.model
        tokenizer = engine.tokenizer
        eos = self.model.generation_config.eos_token_id
        # The batch decodes greedily; a sampled request's token is drawn by the sampler, which needs the
        # steps one after the other (no asynchronous batching, no CUDA graphs).
        generation = GenerationConfig(max_new_tokens=engine.max_context, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, eos_token_id=eos if eos is not None else -1,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        batching = ContinuousBatchingConfig(
            max_requests_per_batch=slots, page_size=PAGE_SIZE, max_batch_tokens=MAX_BATCH_TOKENS,
            num_blocks=cache_pages(slots, engine.max_context, engine.kv_token_budget),
            use_cuda_graph=False, use_async_batching=False)
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=batching)
        self.manager.logit_processor = request_sampling()
        self.manager.start()
        self.streams: dict[str, TextStream] = {}
        self._warm()

    def _warm(self) -> None:
        """One short request, so that the first client's does not pay for the first step's set-up."""
        started = time.monotonic()
        self.manager.add_request(WARM_PROMPT, request_id="warm-up", max_new_tokens=2)
        while self.manager.is_running() and time.monotonic() - started < 60:
            result = self.manager.get_result(timeout=0.1)
            if result is not None and result.is_finished():
                break

    def add(self, prompt, max_tokens: int, settings) -> str:
        request = uuid.uuid4().hex
        self.streams[request] = TextStream(self.engine.tokenizer)
        self.manager.add_request(prompt.ids, request_id=request, max_new_tokens=max_tokens, streaming=True,
                                 **request_kwargs(settings))
        return request

    def cancel(self, request: str) -> None:
        self.manager.cancel_request(request)
        self.streams.pop(request, None)

    def progress(self, timeout: float) -> list[Progress]:
        found = []
        result = self.manager.get_result(timeout=timeout)
        while result is not None:
            stream = self.streams.get(result.request_id)
            if stream is not None:  # not one cancelled meanwhile
                found.append(self._progress(stream, result))
            result = self.manager.get_result(timeout=0)
        return found

    def _progress(self, stream: TextStream, result) -> Progress:
        tokens = list(result.generated_tokens)
        if result.error:
            self.streams.pop(result.request_id, None)
            message = OOM_MESSAGE if "out of memory" in result.error.lower() else f"Generation failed: {result.error}"
            return Progress(result.request_id, "", len(tokens), True, message)
        finished = result.is_finished()
        if finished:
            self.streams.pop(result.request_id, None)
        return Progress(result.request_id, stream.text(tokens), len(tokens), finished)

    def failure(self) -> str | None:
        if self.manager.is_running():
            return None
        error = getattr(self.manager.background_thread_status, "fatal_error", None)
        return OOM_MESSAGE if self.engine.is_out_of_memory(error) else f"Generation failed: {error}"

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30, hard_stop=True)  # what still runs is cancelled
        if hasattr(self.model, "destroy_cached_continuous_batching_manager"):
            self.model.destroy_cached_continuous_batching_manager()
        self.streams.clear()

