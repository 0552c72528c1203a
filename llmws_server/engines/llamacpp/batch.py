"""Requests on llama.cpp generating together (engines.api.Batch), knowing nothing of the queue or the
sessions: one context with a sequence per request, as llama.cpp's server slots do. A thread of its own
takes new requests in (their prompts), then decodes one token of every running request per step; each
request chooses its tokens with its own Decoding (its sampler chain, and its grammar and log probabilities
when its settings ask), the same class generate() uses alone.

Each sequence has KV cells of its own, a full context's worth (llama.cpp's per-sequence streams, not one
shared cache): with them a greedy text in a batch is the text of the same request alone, token for token,
and so is a seeded sampled one. A sequence keeps its cells after its request: the next request that starts
with the same tokens (the next turn of a chat) takes that sequence and computes only what follows them."""
import codecs
import ctypes
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from llmws_server.config import GenerationSettings
from llmws_server.engines.api import Progress, Prompt, TokenLogprob, queued_progress
from llmws_server.errors import Refused

if TYPE_CHECKING:
    from llama_cpp.llama_cpp import llama_sampler_p  # a name for type checkers only

    from llmws_server.engines.llamacpp.engine import LlamaCppEngine  # which imports this module

PENALTY_WINDOW = 64  # tokens the repetition penalty looks back over (llama-cpp-python's generate: the same)
CANCELLED_KEPT = 1024  # cancelled request names remembered, to drop results already on their way
# llama.cpp's llama_token_data, for a whole vocabulary of candidates in one numpy array
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


def make_sampler(settings: GenerationSettings, vocab_size: int, answer_tokens: int) -> "llama_sampler_p":
    """generate()'s chain for these settings: penalties, then greedy, or top_k, top_p, temperature and a draw
    (from the request's seed, else a random one)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    steps = [llama_cpp.llama_sampler_init_penalties(vocab_size, PENALTY_WINDOW, settings.repetition_penalty, 0.0, 0.0)]
    if settings.frequency_penalty or settings.presence_penalty:
        # OpenAI's penalties count a token over the whole answer (the chain sees only the answer's tokens)
        steps.append(llama_cpp.llama_sampler_init_penalties(vocab_size, max(1, answer_tokens), 1.0,
                                                            settings.frequency_penalty, settings.presence_penalty))
    if settings.sampled:
        seed = settings.seed if settings.seed is not None else random.getrandbits(32)
        steps += [llama_cpp.llama_sampler_init_top_k(settings.top_k),
                  llama_cpp.llama_sampler_init_top_p(settings.top_p, 1),
                  llama_cpp.llama_sampler_init_min_p(0.0, 1), llama_cpp.llama_sampler_init_temp(settings.temperature),
                  llama_cpp.llama_sampler_init_dist(seed)]
    else:
        steps.append(llama_cpp.llama_sampler_init_greedy())
    for step in steps:
        llama_cpp.llama_sampler_chain_add(chain, step)  # the chain owns its steps
    return chain


def log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    top = values.max()
    return values - (top + np.log(np.exp(values - top).sum()))


class Decoding:
    """How one request chooses its tokens, alone (generate()) or in a batch: its sampler chain and, as its
    settings ask, the JSON schema's grammar that constrains it (llguidance) and the log probabilities of
    what it chose. A request with neither is the chain's alone, in llama.cpp, as before."""

    def __init__(self, engine: "LlamaCppEngine", settings: GenerationSettings, answer_tokens: int):
        self.engine = engine
        assert engine.llama is not None  # a loaded model
        self.vocab_size = engine.llama.n_vocab()
        self.logprobs: int | None = settings.logprobs  # None: not reported; N: the N likeliest besides
        # errors.Refused for a schema no JSON matches, before anything is made that would need freeing
        self.matcher = engine.json_matcher(settings.json_schema) if settings.json_schema is not None else None
        self.chain = make_sampler(settings, self.vocab_size, answer_tokens)
        # Plain greedy (no penalty, grammar or logprobs): the chain would only copy the whole vocabulary into
        # candidates and take the first highest logit, which numpy's argmax over the logits row gives as well
        # (the same token, ties included), without the copy.
        self.argmax = (not settings.sampled and not settings.penalized and settings.plain)

    def choose(self, context: llama_cpp.llama_context_p, index: int) -> tuple[int, TokenLogprob | None]:
        """The next token from the logits at batch position `index` (-1: the last), and its log
        probabilities when the request asked for them."""
        if self.argmax:
            return int(self._logits(context, index).argmax()), None
        if self.matcher is None and self.logprobs is None:
            return llama_cpp.llama_sampler_sample(self.chain, context, index), None
        logits = self._logits(context, index)
        if self.matcher is not None:
            self._forbid_what_the_grammar_does_not_allow(logits)
        if self.logprobs is None:
            token, logprob = llama_cpp.llama_sampler_sample(self.chain, context, index), None
        else:
            token, logprob = self._sample_reporting(logits)
        if self.matcher is not None:
            self.matcher.consume_token(token)
        return token, logprob

    def _logits(self, context: llama_cpp.llama_context_p, index: int) -> np.ndarray:
        """The context's own logits row at batch position `index`: a view, not a copy."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), shape=(self.vocab_size,))

    @property
    def grammar_complete(self) -> bool:
        """The schema's JSON is whole: nothing may follow it (or the matcher failed: nothing can)."""
        return self.matcher is not None and self.matcher.is_stopped()

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.chain)

    def _forbid_what_the_grammar_does_not_allow(self, logits: np.ndarray) -> None:
        """Logit -inf, in the context's own logits, for every token the grammar does not allow next (its
        mask: a bit per token, little-endian; once the JSON is whole, only the end of sequence)."""
        assert self.matcher is not None
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        logits[np.unpackbits(bits, bitorder="little")[:self.vocab_size] == 0] = -np.inf

    def _sample_reporting(self, logits: np.ndarray) -> tuple[int, TokenLogprob]:
        """What llama_sampler_sample does, done here so that the candidates the chain kept can be read back:
        penalised, cut by top-k and top-p, divided by the temperature (greedy: the whole vocabulary,
        penalised). Their softmax is the distribution the token was drawn from."""
        candidates = np.empty(self.vocab_size, TOKEN_DATA)
        candidates["id"] = np.arange(self.vocab_size, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
                                                 self.vocab_size, -1, False)
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        kept = np.ctypeslib.as_array(array.data, shape=(array.size,))  # sorted and cut in place
        token = int(kept["id"][array.selected])
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token, self._logprob(kept["id"], log_softmax(kept["logit"]), array.selected)

    def _logprob(self, ids: np.ndarray, logprobs: np.ndarray, chosen: int) -> TokenLogprob:
        """The chosen token's log probability, and the `self.logprobs` likeliest tokens, best first (those
        of probability 0, cut by top-k, top-p or the grammar, are left out: there may be fewer)."""
        assert self.logprobs is not None
        count = min(self.logprobs, len(ids))
        best = np.argpartition(-logprobs, count - 1)[:count] if count else np.empty(0, dtype=np.int64)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        piece = self.engine.piece
        top = tuple((piece(int(ids[i])), float(logprobs[i])) for i in best if np.isfinite(logprobs[i]))
        return TokenLogprob(piece(int(ids[chosen])), float(logprobs[chosen]), top)


@dataclass
class Sequence:
    name: str
    ids: list[int]
    max_tokens: int
    decoding: Decoding  # from add() to its end, when it is freed
    seq: int = -1  # llama.cpp's sequence id while it runs
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    generated: int = 0
    last: int = -1  # the token the next step feeds


def shared_start(held: list[int], ids: list[int]) -> int:
    """How many tokens the two lists start with alike."""
    for count, (a, b) in enumerate(zip(held, ids)):
        if a != b:
            return count
    return min(len(held), len(ids))


class LlamaCppBatch:
    def __init__(self, engine: "LlamaCppEngine", slots: int):
        self.engine, self.slots = engine, slots
        self.model = self.llama._model
        # The one-request context's settings (threads, batch sizes, no flash attention: the same numbers as
        # generate()), with a full context for each of `slots` sequences.
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llama.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = slots * engine.max_context, slots, False
        self.context = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.context:
            raise MemoryError(f"llama.cpp could not make a context of {engine.max_context} tokens for each of "
                              f"{slots} requests")
        self.batch = llama_cpp.llama_batch_init(max(self.llama.n_batch, slots), 0, 1)
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

    @property
    def llama(self) -> llama_cpp.Llama:
        """The engine's model (a batch is closed before its engine unloads)."""
        assert self.engine.llama is not None
        return self.engine.llama

    # -- engines.api.Batch ------------------------------------------------------------------------------------

    def add(self, prompt: Prompt, max_tokens: int, settings: GenerationSettings) -> str:
        name = f"r{random.getrandbits(64):016x}"
        try:
            decoding = Decoding(self.engine, settings, max_tokens)
        except Refused as exc:  # a schema no JSON matches: this request fails, at once
            self.results.put(Progress(name, "", 0, True, error=str(exc)))
            return name
        sequence = Sequence(name, list(prompt.ids), max_tokens, decoding)
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
        return queued_progress(self.results, timeout, self.cancelled)

    def failure(self) -> str | None:
        return self.error

    def close(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(30)
        for sequence in [*self.running.values(), *self.waiting]:
            sequence.decoding.free()
        self.running.clear()
        self.waiting.clear()
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
        for sequence in [s for s in self.waiting if s.name in self.cancelled]:
            self.waiting.remove(sequence)
            sequence.decoding.free()
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
        ids, chunk = sequence.ids, self.llama.n_batch
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
        """Choose the sequence's next token from the logits at `index`, and report it. A request ends at the
        end of sequence (or of the turn), at its max_tokens, or once its schema's JSON is whole."""
        token, logprob = sequence.decoding.choose(self.context, index)
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            self._report(sequence, sequence.decoder.decode(b"", final=True), True)
            return
        sequence.generated += 1
        sequence.last = token
        text = sequence.decoder.decode(self.llama.detokenize([token]))
        finished = sequence.generated >= sequence.max_tokens or sequence.decoding.grammar_complete
        if finished:
            text += sequence.decoder.decode(b"", final=True)
        self._report(sequence, text, finished, (logprob,) if logprob is not None else ())

    def _report(self, sequence: Sequence, text: str, finished: bool, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        self.results.put(Progress(sequence.name, text, sequence.generated, finished, logprobs=logprobs))
        if finished:
            self._end(sequence)

    def _end(self, sequence: Sequence) -> None:
        """Free the sequence for the next request (its cells stay, for a request that starts the same way)."""
        sequence.decoding.free()
        del self.running[sequence.seq]
