"""The batching worker: the same FIFO, but up to `max_batch_size` requests generate at once, through
transformers' continuous batching (`model.init_continuous_batching()`).

Requests are admitted in arrival order, each as soon as a slot frees. A batch is either greedy or
sampling; sampled requests share a batch whatever their temperature, top_p and top_k (transformers'
per-request processors). A request of the other kind waits, in order, until the batch drains.
Continuous batching cannot apply a repetition penalty, so a request with repetition_penalty other than
1.0 runs alone, as with the one-at-a-time worker, once the batch has drained; so does a model switch.
Nothing is admitted past a request that waits.
"""
import logging
import math
import time
import uuid

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from .config import is_sampled
from .worker import OOM_MESSAGE, InferenceJob, Worker

log = logging.getLogger("llmws.batching")
PAGE_SIZE = 256
# Tokens one batching step may take in (longer prompts are prefilled in pieces). transformers' default of
# 8192 makes a float mask of 8192 x (cache + 8192) tokens: gigabytes, filled on every new manager.
MAX_BATCH_TOKENS = 512


# A sampling manager is made with these so that it has every warper; each request then passes its own values.
SAMPLING_PLACEHOLDERS = {"temperature": 0.5, "top_p": 0.5, "top_k": 50}


def settings_key(settings: dict) -> str:
    """What must be equal for two requests to share a batch."""
    return "sample" if is_sampled(settings) else "greedy"


def sampling_kwargs(settings: dict) -> dict:
    """A sampled request's own settings, as the per-request processors take them (top_k 0 keeps every token)."""
    if not is_sampled(settings):
        return {}
    return {"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
            "top_k": int(settings["top_k"])}


def cache_pages(slots: int, max_context: int, kv_token_budget: int | None) -> int:
    """KV pages for the batch: every slot at the full context, but no more than free memory holds. The
    scheduler shares the pages out as requests grow; when they run short it admits no new prompt until
    some free up."""
    tokens = slots * max_context
    if kv_token_budget is not None:
        tokens = max(min(tokens, kv_token_budget), max_context)
    return math.ceil(tokens / PAGE_SIZE)


def batchable(job) -> bool:
    """Continuous batching takes token ids only: a request with images runs alone, like a penalty."""
    return isinstance(job, InferenceJob) and job.settings["repetition_penalty"] == 1.0 and not job.images


class Running:
    """One request in the batch: its job, limits, and how much of its text has been sent."""

    def __init__(self, internal_id, job, max_tokens):
        self.id = internal_id  # the batching manager's name for it
        self.job = job
        self.max_tokens = max_tokens
        self.started = time.monotonic()
        self.deadline = self.started + job.timeout_s
        self.sent = 0  # characters of the decoded text already emitted


class BatchingWorker(Worker):
    def __init__(self, engine, max_batch_size: int):
        super().__init__(engine)
        self.max_batch_size = max_batch_size
        self.batch: dict[str, Running] = {}  # internal id -> request
        self.manager = None
        self.manager_key = None

    def _busy(self) -> int:
        """1 while the next job cannot start at once: no slot is free, something runs alone, or the batch
        runs other settings than the next job's (lock held)."""
        if self.running is not None or len(self.batch) >= self.max_batch_size:
            return 1
        return int(bool(self.batch and self.queue and not self._joins(self.queue.head())))

    def _joins(self, job) -> bool:
        return batchable(job) and settings_key(job.settings) == self.manager_key

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.batch and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    break
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            if self.batch:
                self._collect()
        for running in list(self.batch.values()):
            self._finish(running, len(running.job.tokens), "cancelled")
        self._stop_manager()

    def _admit(self) -> list:
        """Jobs to start now, from the head of the queue (lock held)."""
        admitted = []
        while self.queue and len(self.batch) + len(admitted) < self.max_batch_size:
            job = self.queue.head()
            joins = batchable(job) and (not (self.batch or admitted) or self._joins(job))
            if not joins and (self.batch or admitted):
                break  # it must run alone, or with other settings: wait for the batch to drain
            admitted.append(self.queue.popleft())
            if not batchable(job):
                break
        if admitted:
            self._positions_changed()
        return admitted

    def _start(self, job) -> None:
        if not batchable(job):  # a model switch or a repetition penalty, with nothing else generating
            self._stop_manager()
            self.running = job
            self._run(job)
            self.running = None
            return
        try:
            self._add(job)
        except Exception as exc:
            log.exception("request %s could not start", job.request_id)
            job.fail(f"Generation failed: {exc}")

    def _add(self, job) -> None:
        job.tokens = []
        prepared = job.prepare(self.engine)
        if prepared is None:
            return
        prompt, max_tokens = prepared
        self._ensure_manager(settings_key(job.settings), job.settings)
        internal_id = uuid.uuid4().hex
        self.batch[internal_id] = Running(internal_id, job, max_tokens)
        self.manager.add_request(prompt.ids, request_id=internal_id, max_new_tokens=max_tokens, streaming=True,
                                 **sampling_kwargs(job.settings))

    def _ensure_manager(self, key, settings) -> None:
        if self.manager is not None and self.manager_key == key and self.manager.is_running():
            return
        self._stop_manager()
        engine = self.engine
        eos = engine.model.generation_config.eos_token_id
        sampling = key == "sample"
        warpers = SAMPLING_PLACEHOLDERS if sampling else {"temperature": None, "top_p": None, "top_k": None}
        generation = GenerationConfig(
            max_new_tokens=settings["max_new_tokens"], do_sample=sampling, eos_token_id=eos if eos is not None else -1,
            pad_token_id=engine.tokenizer.pad_token_id or engine.tokenizer.eos_token_id, **warpers)
        pages = cache_pages(self.max_batch_size, engine.max_context, engine.kv_token_budget)
        batching = ContinuousBatchingConfig(max_requests_per_batch=self.max_batch_size, page_size=PAGE_SIZE,
                                            num_blocks=pages, max_batch_tokens=MAX_BATCH_TOKENS,
                                            per_request_processors=sampling)
        self.manager = engine.model.init_continuous_batching(generation_config=generation,
                                                             continuous_batching_config=batching)
        self.manager.start()
        self.manager_key = key

    def _stop_manager(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)
            if hasattr(self.engine.model, "destroy_cached_continuous_batching_manager"):
                self.engine.model.destroy_cached_continuous_batching_manager()
            self.manager = self.manager_key = None

    def _collect(self) -> None:
        """Hand on what the batch produced in the last moment; end cancelled and overdue requests."""
        result = self.manager.get_result(timeout=0.02)
        while result is not None:
            running = self.batch.get(result.request_id)
            if running is not None:
                self._progress(running, result)
            result = self.manager.get_result(timeout=0)
        now = time.monotonic()
        for internal_id, running in list(self.batch.items()):
            reason = "cancelled" if running.job.cancelled.is_set() else "timeout" if now > running.deadline else None
            if reason:
                self.manager.cancel_request(internal_id)
                self._finish(running, len(running.job.tokens), reason)
        if self.batch and not self.manager.is_running():
            self._fail_batch()

    def _progress(self, running, result) -> None:
        job = running.job
        job.tokens = list(result.generated_tokens)
        if result.error:
            self._end(running)
            job.fail(OOM_MESSAGE if "out of memory" in result.error.lower() else f"Generation failed: {result.error}")
            return
        text = self.engine.tokenizer.decode(job.tokens, skip_special_tokens=True)
        finished = result.is_finished()
        ready = text if finished or not text.endswith("\ufffd") else text[:len(text) - 1]  # a half character waits
        if len(ready) > running.sent:
            job.emit({"type": "token", "data": ready[running.sent:]})
            running.sent = len(ready)
        if finished:
            self._finish(running, len(job.tokens), "length" if len(job.tokens) >= running.max_tokens else "stop")

    def _finish(self, running, generated: int, reason: str) -> None:
        self._end(running)
        running.job.finish(generated, reason, running.started)

    def _end(self, running) -> None:
        self.batch.pop(running.id, None)
        with self.lock:
            self._positions_changed()

    def _fail_batch(self) -> None:
        """The batching thread died (out of memory, say): fail its requests, start afresh for the next."""
        error = getattr(self.manager.background_thread_status, "fatal_error", None)
        log.error("continuous batching stopped: %s", error)
        message = OOM_MESSAGE if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) else (
            f"Generation failed: {error}")
        for running in list(self.batch.values()):
            self._end(running)
            running.job.fail(message)
        self.manager = self.manager_key = None
