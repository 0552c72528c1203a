"""A request's own choice of each token, for what the batch's vectorised rows do not do: a seed (its own
random generator), OpenAI's frequency and presence penalties, logprobs, and a JSON schema (llguidance's
matcher masks the tokens the grammar does not allow). The batch's sampler (sampling.py) asks a request's
Picker for its row, and generate() runs one as a logits processor, so a request picks its tokens the same
way alone and in a batch. A request whose settings are plain has no Picker and costs nothing here."""
import math
import threading
from collections.abc import Callable

import llguidance
import llguidance.numpy as guidance_numpy
import llguidance.torch as guidance_torch
import torch
from transformers import LogitsProcessor

from llmws_server.config import GenerationSettings
from llmws_server.engines.api import TokenLogprob
from llmws_server.grammar import grammar

MAX_LOGPROBS = 20


class Picker:
    def __init__(self, settings: GenerationSettings, grammar_tokenizer: Callable[[], llguidance.LLTokenizer],
                 token_text: Callable[[int], str], eos: set[int]):
        self.settings, self.token_text, self.eos = settings, token_text, eos
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self.counts: dict[int, int] = {}  # the answer's tokens so far, for the OpenAI penalties
        self.logprobs: list[TokenLogprob] = []  # not yet handed on
        self.picked = 0  # tokens of the answer picked so far (an end token aside)
        self.matcher: llguidance.LLMatcher | None = None
        # The batch's thread picks while the scheduler's reads `done` and takes the logprobs: the matcher is
        # touched on the picking thread only (another thread's is_stopped() during its consume_token raised
        # "Already mutably borrowed" and ended the scheduler), and the logprobs change hands under a lock.
        self.complete = False  # the schema is complete, as the matcher said after the last token
        self.lock = threading.Lock()
        if settings.json_schema is not None:
            tokenizer = grammar_tokenizer()
            self.matcher = llguidance.LLMatcher(tokenizer, grammar(settings.json_schema))
            self.bitmask = guidance_torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def pick(self, scores: torch.Tensor) -> int:
        """The next token, from one row of logits (the repetition penalty already applied)."""
        scores = scores.float().clone()
        self._penalise(scores)
        if self.matcher is not None:
            if self.complete:  # the schema is complete: the answer ends (`done` stops a model
                return min(self.eos, default=0)  # without an end token)
            self._mask(self.matcher, scores)
        if self.settings.sampled:
            distribution = self._sampled_distribution(scores)
            token = int(torch.multinomial(distribution.exp(), 1, generator=self.generator))
        else:
            distribution = scores.log_softmax(-1)
            token = int(distribution.argmax())
        self._note(token, distribution)
        return token

    @property
    def done(self) -> bool:
        """The schema is complete: nothing may follow."""
        return self.complete

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        with self.lock:
            taken, self.logprobs = tuple(self.logprobs), []
        return taken

    def _penalise(self, scores: torch.Tensor) -> None:
        frequency, presence = self.settings.frequency_penalty, self.settings.presence_penalty
        if not self.counts or not (frequency or presence):
            return
        tokens = torch.tensor(list(self.counts), dtype=torch.long)
        counts = torch.tensor(list(self.counts.values()), dtype=scores.dtype)
        scores[tokens] -= frequency * counts + presence

    def _mask(self, matcher: llguidance.LLMatcher, scores: torch.Tensor) -> None:
        """-inf for the tokens the grammar does not allow. On the CPU through llguidance's numpy kernel: its
        torch kernel is torch.compile'd (the first row waits for the compile) and its parallel passes stall
        on a busy CPU (bench/constraint_cost.py; docs/benchmarks.md); elsewhere on the device."""
        guidance_torch.fill_next_token_bitmask(matcher, self.bitmask, 0)
        allowed = scores[: self.bitmask.size(1) * 32]
        if allowed.is_cpu:
            guidance_numpy.apply_token_bitmask_inplace(allowed.numpy(), self.bitmask.numpy())
        else:
            guidance_torch.apply_token_bitmask_inplace(allowed.unsqueeze(0), self.bitmask.to(allowed.device))
        scores[allowed.size(0):] = float("-inf")  # tokens past the tokenizer's vocabulary: padding rows

    def _sampled_distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """Log probabilities of the distribution a sampled request draws from: temperature, then top_k,
        then top_p (as generate() and the batch's rows sample); -inf outside it."""
        settings = self.settings
        scores = scores / settings.temperature
        if 0 < settings.top_k < scores.numel():
            kept = scores.topk(settings.top_k).values[-1]
            scores = scores.masked_fill(scores < kept, float("-inf"))
        if settings.top_p < 1.0:
            values, indices = scores.sort(descending=True)
            probs = values.softmax(-1)
            before = probs.cumsum(-1) - probs  # the probability of the better candidates
            scores[indices[before >= settings.top_p]] = float("-inf")  # the best always stays
        return scores.log_softmax(-1)

    def _note(self, token: int, distribution: torch.Tensor) -> None:
        if token in self.eos:
            return
        self.picked += 1
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None:
            self.matcher.consume_token(token)
            self.complete = self.matcher.is_stopped()
        wanted = self.settings.logprobs
        if wanted is None:
            return
        top = distribution.topk(min(wanted, MAX_LOGPROBS)) if wanted else None
        best = () if top is None else tuple(
            (self.token_text(int(index)), _finite(float(value))) for value, index in zip(top.values, top.indices))
        with self.lock:
            self.logprobs.append(TokenLogprob(self.token_text(token), _finite(float(distribution[token])), best))


def _finite(value: float) -> float:
    """JSON has no -inf: a token outside the distribution gets the lowest float."""
    return value if math.isfinite(value) else -9999.0


class PickerProcessor(LogitsProcessor):
    """generate()'s logits processor for a request with a Picker: its token, forced on the greedy search."""

    def __init__(self, picker: Picker):
        self.picker = picker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        return force(scores, self.picker.pick(scores[0]))


def force(scores: torch.Tensor, token: int) -> torch.Tensor:
    """Logits that make any argmax pick `token` (a row, or rows of one)."""
    forced = torch.full_like(scores, float("-inf"))
    forced[..., token] = 0.0
    return forced
