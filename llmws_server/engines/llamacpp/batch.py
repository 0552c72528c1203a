"""Requests on llama.cpp generating together (engines.api.Batch), knowing nothing of the queue or the
sessions: one context with a sequence per request, as llama.cpp's server slots do. A thread of its own
takes new requests in (their prompts), then decodes one token of every running request per step; each
request samples with its own sampler chain.

Each sequence has KV cells of its own, a full context's worth (llama.cpp's per-sequence streams, not one
shared cache): with them a greedy text in a batch is the text of the same request alone, token for token.
A sequence keeps its cells after its request: the next request that starts with the same tokens (the
next turn of a chat) takes that sequence and computes only what follows them."""
import codecs
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field

import llama_cpp

from llmws_server.engines.api import Progress

PENALTY_WINDOW = 64  # tokens the repetition penalty looks back over (llama-cpp-python's generate: the same)
CANCELLED_KEPT = 1024  # cancelled request names remembered, to drop results already on their way


@dataclass
class Sequence:
    name: str
    ids: list[int]
    max_tokens: int
    settings: object
    seq: int = -1  # llama.cpp's sequence id while it runs
    sampler: object = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    generated: int = 0
    last: int = -1  # the token the next step feeds


def make_sampler(settings, vocab_size: int):
    """generate()'s chain for these settings: penalties, then greedy, or top_k, top_p, temperature and a draw."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    steps = [llama_cpp.llama_sampler_init_penalties(vocab_size, PENALTY_WINDOW, settings.repetition_penalty, 0.0, 0.0)]
    if settings.sampled:
        steps += [llama_cpp.llama_sampler_init_top_k(settings.top_k),
                  llama_cpp.llama_sampler_init_top_p(settings.top_p, 1),
                  llama_cpp.llama_sampler_init_min_p(0.0, 1), llama_cpp.llama_sampler_init_temp(settings.temperature),
                  llama_cpp.llama_sampler_init_dist(random.getrandbits(32))]
    else:
        steps.append(llama_cpp.llama_sampler_init_greedy())
    for step in steps:
        llama_cpp.llama_sampler_chain_add(chain, step)  # the chain owns its steps
    return chain


def shared_start(held: list[int], ids: list[int]) -> int:
    """How many tokens the two lists start with alike."""
    for count, (a, b) in enumerate(zip(held, ids)):
        if a != b:
            return count
    return min(len(held), len(ids))


class LlamaCppBatch:
    def __init__(self, engine, slots: int):
        self.engine, self.slots = engine, slots
        self.model = engine.llama._model
        self.vocab_size = engine.llama.n_vocab()
        # The one-request context's settings (threads, batch sizes, no flash attention: the same numbers as
        # generate()), with a full context for each of `slots` sequences.
        params = llama_cpp.llama_context_params.from_buffer_copy(engine.llama.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = slots * engine.max_context, slots, False
        self.context = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.context:
            raise MemoryError(f"llama.cpp could not make a context of {engine.max_context} tokens for each of "
                              f"{slots} requests")
        self.batch = llama_cpp.llama_batch_init(max(engine.llama.n_batch, slots), 0, 1)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.held: dict[int, list[int]] = {seq: [] for seq in range(slots)}  # the tokens each sequence's cells hold
        self.cancelled: dict[str, None] = {}  # the latest CANCELLED_KEPT cancelled requests, oldest first
        self.results: queue.Queue[Progress] = queue.Queue()
        self.wake = threading.Condition()
        self.stopping = False
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="llama.cpp-batch", daemon=True)
        self.thread.start()

    # -- engines.api.Batch ------------------------------------------------------------------------------------

    def add(self, prompt, max_tokens: int, settings) -> str:
        sequence = Sequence(f"r{random.getrandbits(64):016x}", list(prompt.ids), max_tokens, settings)
        with self.wake:
            self.waiting.append(sequence)
            self.wake.notify()
        return sequence.name

    def cancel(self, request: str) -> None:
        with self.wake:
            self.cancelled[request] = None
            while len(self.cancelled) > CANCELLED_KEPT:  # long gone from the batch and its results
                del self.cancelled[next(iter(self.cancelled))]

    def progress(self, timeout: float) -> list[Progress]:
        try:
            found = [self.results.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.results.empty():
            found.append(self.results.get_nowait())
        return [item for item in found if item.request not in self.cancelled]

    def failure(self) -> str | None:
        return self.error

    def close(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(30)
        for sequence in self.running.values():
            llama_cpp.llama_sampler_free(sequence.sampler)
        self.running.clear()
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.context)

    # -- the batch's thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.wake:
                    while not self.stopping and not self.running and not self.waiting:
                        self.wake.wait()
                    if self.stopping:
                        return
                    self._drop_cancelled()
                    admitted = self._admit()
                for sequence in admitted:
                    self._prefill(sequence)
                if self.running:
                    self._step()
        except Exception as exc:  # the batch is dead: the scheduler fails what it held
            self.error = f"Generation failed: {exc}"

    def _drop_cancelled(self) -> None:
        for name in self.cancelled.keys() & {sequence.name for sequence in self.waiting}:
            self.waiting = deque(sequence for sequence in self.waiting if sequence.name != name)
        for sequence in [s for s in self.running.values() if s.name in self.cancelled]:
            self._end(sequence)

    def _admit(self) -> list[Sequence]:
        """Waiting requests in order, while a sequence is free: the free one that holds the longest start of
        the request's tokens."""
        admitted = []
        while self.waiting and len(self.running) < self.slots:
            sequence = self.waiting.popleft()
            free = [seq for seq in range(self.slots) if seq not in self.running]
            sequence.seq = max(free, key=lambda seq: (shared_start(self.held[seq], sequence.ids), -seq))
            sequence.sampler = make_sampler(sequence.settings, self.vocab_size)
            self.running[sequence.seq] = sequence
            admitted.append(sequence)
        return admitted

    def _put(self, index: int, token: int, position: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, position, 1
        batch.seq_id[index][0], batch.logits[index] = seq, logits

    def _decode(self, count: int) -> None:
        self.batch.n_tokens = count
        status = llama_cpp.llama_decode(self.context, self.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _prefill(self, sequence: Sequence) -> None:
        """The prompt after what the sequence's cells hold already (at least its last token, whose logits give
        the first token), in chunks of n_batch."""
        ids, chunk = sequence.ids, self.engine.llama.n_batch
        kept = min(shared_start(self.held[sequence.seq], ids), len(ids) - 1)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.context), sequence.seq, kept, -1)
        self.held[sequence.seq] = list(ids)
        for start in range(kept, len(ids), chunk):
            part = ids[start:start + chunk]
            for index, token in enumerate(part):
                self._put(index, token, start + index, sequence.seq, start + index == len(ids) - 1)
            self._decode(len(part))
        self._take(sequence, len(part) - 1)

    def _step(self) -> None:
        """One token for every running request."""
        order = list(self.running.values())
        for index, sequence in enumerate(order):
            self._put(index, sequence.last, len(sequence.ids) + sequence.generated - 1, sequence.seq, True)
            self.held[sequence.seq].append(sequence.last)
        self._decode(len(order))
        for index, sequence in enumerate(order):
            self._take(sequence, index)

    def _take(self, sequence: Sequence, index: int) -> None:
        """Sample the sequence's next token from the logits at `index`, and report it."""
        token = llama_cpp.llama_sampler_sample(sequence.sampler, self.context, index)
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):  # end of sequence, or of the turn
            self._report(sequence, sequence.decoder.decode(b"", final=True), True)
            return
        sequence.generated += 1
        sequence.last = token
        text = sequence.decoder.decode(self.engine.llama.detokenize([token]))
        finished = sequence.generated >= sequence.max_tokens
        if finished:
            text += sequence.decoder.decode(b"", final=True)
        self._report(sequence, text, finished)

    def _report(self, sequence: Sequence, text: str, finished: bool) -> None:
        self.results.put(Progress(sequence.name, text, sequence.generated, finished))
        if finished:
            self._end(sequence)

    def _end(self, sequence: Sequence) -> None:
        """Free the sequence for the next request (its cells stay, for a request that starts the same way)."""
        llama_cpp.llama_sampler_free(sequence.sampler)
        del self.running[sequence.seq]
