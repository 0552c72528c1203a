"""Per-request sampling inside transformers' continuous batching: each request in a batch keeps its own
settings (greedy or sampled, temperature, top_k, top_p, repetition penalty), so every text request can
share one batch.

It is one of transformers' per-request logits processors (ContinuousBatchingLogitsProcessor), doing in
one pass what generate() does with RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper, in that order, with two differences that make it cheap:
- the batch decodes greedily (argmax), and a sampled row draws its token here and keeps only it: a greedy
  row costs nothing, and a sampled one a draw among its top_k candidates (torch.topk), not a sort of the
  whole vocabulary (transformers' per-request top-k and top-p sort it twice, a sixth of a CPU's step:
  docs/benchmarks.md, "The figures behind the engines' rules");
The repetition penalty needs each request's own tokens, which do not fit the processors' one number per
row: the rows' token ids are gathered when the step is prepared, so the manager must run steps one after
the other (no asynchronous batching, no CUDA graphs; batching.py sets both).
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from llmws_server.config import GenerationSettings
from llmws_server.engines.transformers.picking import Picker, force


def request_kwargs(settings: GenerationSettings) -> dict:
    """A request's settings as the sampler reads them (the manager checks their types). A request whose
    settings are not plain has a Picker (picking.py), which chooses its token: the batch's row is greedy."""
    return {"greedy": not settings.sampled or not settings.plain, "temperature": float(settings.temperature),
            "top_p": float(settings.top_p), "top_k": int(settings.top_k),
            "repetition_penalty": float(settings.repetition_penalty)}


@dataclass
class Step:
    """The settings of the rows of one batching step, one row per request that gets a token."""
    rows: int
    sampled: torch.Tensor  # row numbers; the other rows are greedy
    temperature: torch.Tensor  # per sampled row
    top_k: torch.Tensor  # per sampled row, 0 for no limit
    top_p: torch.Tensor  # per sampled row
    penalty_rows: torch.Tensor  # (row, token) pairs to penalise, and each pair's penalty
    penalty_tokens: torch.Tensor
    penalties: torch.Tensor
    picked: list[tuple[int, Picker]]  # rows whose request picks its own token

    @classmethod
    def of(cls, requests: Sequence[Any], pickers: dict[str, Picker] | None = None) -> "Step":
        sampled, temperature, top_k, top_p = [], [], [], []
        tokens: list[int]
        picked: list[tuple[int, Picker]] = []
        rows, tokens, penalties = [], [], []
        for row, request in enumerate(requests):
            state = request.state
            if pickers and state.request_id in pickers:
                picked.append((row, pickers[state.request_id]))
            kwargs = state.logit_processor_kwargs
            if not kwargs.get("greedy", True):
                sampled.append(row)
                temperature.append(kwargs["temperature"])
                top_k.append(kwargs["top_k"])
                top_p.append(kwargs["top_p"])
            penalty = kwargs.get("repetition_penalty", 1.0)
            if penalty != 1.0:  # over the prompt and the answer so far, each token once
                seen = {token for token in (*state.initial_tokens, *state.generated_tokens) if token >= 0}
                rows.extend([row] * len(seen))
                tokens.extend(seen)
                penalties.extend([penalty] * len(seen))
        return cls(len(requests), torch.tensor(sampled, dtype=torch.long),
                   torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_k, dtype=torch.long),
                   torch.tensor(top_p, dtype=torch.float32), torch.tensor(rows, dtype=torch.long),
                   torch.tensor(tokens, dtype=torch.long), torch.tensor(penalties, dtype=torch.float32), picked)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: [rows, vocabulary] logits, changed in place so that the batch's argmax picks each row's
        token: a greedy row's best one (after its penalty), a sampled row's draw."""
        device = scores.device
        if len(self.penalty_rows):
            rows, tokens = self.penalty_rows.to(device), self.penalty_tokens.to(device)
            picked, penalty = scores[rows, tokens], self.penalties.to(device)
            scores[rows, tokens] = torch.where(picked < 0, picked * penalty, picked / penalty)
        if len(self.sampled):
            rows = self.sampled.to(device)
            drawn = self._draw(scores[rows], device)
            scores[rows] = torch.full_like(scores[rows], float("-inf")).scatter(1, drawn, 0.0)
        for row, picker in self.picked:
            scores[row] = force(scores[row], picker.pick(scores[row]))
        return scores

    def _draw(self, scores: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One token per row, drawn as generate() samples: temperature, then top_k, then top_p."""
        scores = scores / self.temperature.to(device).unsqueeze(-1)
        vocabulary = scores.size(-1)
        top_k = torch.where(self.top_k > 0, self.top_k.clamp(max=vocabulary), vocabulary).to(device)
        values, indices = scores.topk(int(top_k.max()), dim=-1)  # sorted, best first
        ranks = torch.arange(values.size(-1), device=device).unsqueeze(0)
        values = values.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the better candidates
        top_p = self.top_p.to(device).unsqueeze(-1)
        probs = probs.masked_fill((before >= top_p) & (top_p < 1.0), 0.0)  # the best always stays
        return indices.gather(1, torch.multinomial(probs, 1))


class RequestSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs = {"greedy": bool, "temperature": float, "top_p": float, "top_k": int,
                        "repetition_penalty": float}
    ignored_kwargs = ()

    def __init__(self, before_next_step: Callable[[], None] | None = None, pickers: dict[str, Picker] | None = None):
        self.step: Step | None = None
        self.pickers = {} if pickers is None else pickers  # the batch's, by request name
        # Run on the manager's thread each time a step's requests are chosen: a request it adds enters the
        # step after this one (batching.py holds a solo run's continuation back that way).
        self.before_next_step = before_next_step

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()  # its one number per row is not used: the step holds the settings

    def prepare_tensor_args(self, requests_with_new_token: Sequence[Any]) -> torch.Tensor:
        self.step = Step.of(requests_with_new_token, self.pickers)
        if self.before_next_step is not None:
            self.before_next_step()
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        # A step the manager made up (the warm-up) has nothing to choose for.
        if self.step is None or self.step.rows != scores.size(0):
            return scores
        return self.step.apply(scores)


def request_sampling(before_next_step: Callable[[], None] | None = None, pickers: dict[str, Picker] | None = None
                     ) -> ContinuousBatchingLogitsProcessorList:
    """The manager's processors: the sampler alone."""
    processors = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList([RequestSampler(before_next_step, pickers)]))
    processors.tensors_required = 1  # the row of numbers every per-request processor is given
    return processors
