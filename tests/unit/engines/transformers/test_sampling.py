"""The batch's per-request sampler (engines/transformers/sampling) against generate()'s own processors: the same token
for a greedy row, the same candidates and odds for a sampled one, the same penalty."""
from types import SimpleNamespace

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmws_server.engines.transformers.sampling import Step

VOCABULARY = 1000
DRAWS = 20000


def request(greedy, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, prompt=(), answer=()):
    kwargs = {"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "repetition_penalty": penalty}
    return SimpleNamespace(state=SimpleNamespace(logit_processor_kwargs=kwargs, initial_tokens=list(prompt),
                                                 generated_tokens=list(answer)))


def reference(scores, row):
    """generate()'s processors, in generate()'s order, for one request."""
    kwargs, state = row.state.logit_processor_kwargs, row.state
    ids = torch.tensor([state.initial_tokens + state.generated_tokens])
    if kwargs["repetition_penalty"] != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(kwargs["repetition_penalty"])(ids, scores)
    if kwargs["greedy"]:
        return scores
    scores = TemperatureLogitsWarper(kwargs["temperature"])(ids, scores)
    if kwargs["top_k"]:
        scores = TopKLogitsWarper(kwargs["top_k"])(ids, scores)
    if kwargs["top_p"] < 1.0:
        scores = TopPLogitsWarper(kwargs["top_p"])(ids, scores)
    return scores


def test_greedy_rows_pick_what_generate_picks_with_and_without_a_penalty():
    torch.manual_seed(0)
    scores = torch.randn(6, VOCABULARY) * 3
    rows = [request(True), request(True, penalty=1.3, prompt=range(0, VOCABULARY, 3), answer=[7, 7, 8]),
            request(True, penalty=0.8, prompt=[1, 2, 3]), request(False, 0.7, 50, 0.9), request(True),
            request(True, penalty=1.5, answer=range(0, VOCABULARY, 2))]
    picked = Step.of(rows).apply(scores.clone()).argmax(dim=-1)
    for index, row in enumerate(rows):
        if row.state.logit_processor_kwargs["greedy"]:
            assert picked[index] == reference(scores[index:index + 1].clone(), row).argmax(), index
    assert len({int(picked[0]), int(picked[1]), int(picked[5])}) > 1  # the penalties moved the choice


def test_sampled_rows_draw_with_generates_odds():
    torch.manual_seed(1)
    scores = torch.randn(1, VOCABULARY) * 2
    for settings in [dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=1.5, top_k=0, top_p=0.5),
                     dict(temperature=1.0, top_k=3, penalty=1.5, prompt=range(0, VOCABULARY, 2))]:
        rows = [request(False, **settings)] * DRAWS
        drawn = Step.of(rows).apply(scores.repeat(DRAWS, 1)).argmax(dim=-1)
        odds = torch.bincount(drawn, minlength=VOCABULARY) / DRAWS
        expected = reference(scores.clone(), rows[0]).softmax(dim=-1)[0]
        assert torch.equal(odds > 0, expected > 0) or not odds[expected == 0].any(), settings
        assert (odds - expected).abs().max() < 0.02, settings


def test_a_row_with_top_k_1_is_greedy_and_every_sampled_row_keeps_one_token():
    torch.manual_seed(2)
    scores = torch.randn(3, VOCABULARY)
    rows = [request(False, 1.0, 1), request(False, 2.0, 0, 1.0), request(False, 0.3, 40, 0.2)]
    out = Step.of(rows).apply(scores.clone())
    assert out[0].argmax() == scores[0].argmax()
    assert (torch.isfinite(out).sum(dim=-1) == 1).all()  # the batch's argmax takes exactly the drawn token
