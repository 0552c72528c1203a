"""The llama.cpp engine's per-request decoding settings, on the default model's GGUF, with no server: a seed,
OpenAI's frequency and presence penalties, logprobs and a JSON schema, each alone (generate()) and in a
batch beside other requests. Skipped where llama-cpp-python is not installed."""
import json
import math
import time
from dataclasses import dataclass, field

import pytest

from llmws_server.config import DEFAULTS, GenerationSettings
from llmws_server.core.tool_templates import choose_style
from llmws_server.errors import Refused

pytest.importorskip("llama_cpp")
MAX_TOKENS = 24
POEM = "Write a poem about the sea"
CATS = "Write the word 'cat' ten times, separated by spaces."  # greedy: "Cat: Cat, Cat, Cat, ..."
CAPITAL = "What is the capital of France?"
TRIP = "Plan a trip: answer in JSON with a city and a number of days."
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city", "days"]}


@dataclass
class Answer:
    text: str = ""
    reason: str = ""
    tokens: int = 0
    logprobs: list = field(default_factory=list)
    error: str | None = None


@pytest.fixture(scope="module")
def engine(default_model):
    from llmws_server.engines.llamacpp.engine import LlamaCppEngine

    with pytest.MonkeyPatch.context() as patch:  # one thread, as the test servers: the CPU is shared
        patch.setenv("OMP_NUM_THREADS", "1")
        loaded = LlamaCppEngine(default_model.parent / "SmolLM2-135M-Instruct-GGUF", None, 1024)
    yield loaded
    loaded.unload()


def settings(**given) -> GenerationSettings:
    """Greedy without a repetition penalty, unless given otherwise."""
    return GenerationSettings(**{**DEFAULTS["generation_defaults"], "max_new_tokens": MAX_TOKENS, "temperature": 0.0,
                                 "repetition_penalty": 1.0, **given})


def sampled(**given) -> GenerationSettings:
    return settings(**{"do_sample": True, "temperature": 0.9, **given})


def prompt_of(engine, user: str):
    return engine.encode([{"role": "user", "content": user}])


def alone(engine, user: str, chosen: GenerationSettings, max_tokens=MAX_TOKENS) -> Answer:
    answer = Answer()

    def on_text(text, logprobs):
        answer.text += text
        answer.logprobs += logprobs

    answer.tokens, answer.reason = engine.generate(prompt_of(engine, user), chosen, max_tokens, on_text,
                                                   should_stop=lambda: None)
    return answer


def together(engine, requests: list[tuple[str, GenerationSettings]], max_tokens=MAX_TOKENS) -> list[Answer]:
    """The requests in one batch, started together; their answers in order (the finish reason as
    core/batching.py derives it)."""
    batch = engine.open_batch(4)
    try:
        names = [batch.add(prompt_of(engine, user), max_tokens, chosen) for user, chosen in requests]
        answers = {name: Answer() for name in names}
        deadline = time.monotonic() + 60
        while not all(answer.reason for answer in answers.values()):
            assert time.monotonic() < deadline and batch.failure() is None
            for progress in batch.progress(0.5):
                answer = answers[progress.request]
                answer.text += progress.text
                answer.logprobs += progress.logprobs
                answer.tokens, answer.error = progress.tokens, progress.error
                if progress.finished:
                    answer.reason = "length" if progress.tokens >= max_tokens else "stop"
        return [answers[name] for name in names]
    finally:
        batch.close()


@pytest.fixture(scope="module")
def greedy_capital(engine) -> Answer:
    """The plain greedy answer (llama-cpp-python's own generate()), the reference of several tests."""
    return alone(engine, CAPITAL, settings())


def test_a_seeded_text_depends_on_the_seed_alone_not_on_its_neighbours(engine):
    first, again, other = (alone(engine, POEM, sampled(seed=seed)) for seed in (7, 7, 8))
    assert first.text and first.text == again.text
    assert other.text != first.text
    beside = together(engine, [("Name a river in Europe.", sampled()), (POEM, sampled(seed=7)),
                               ("Tell me a joke", sampled(temperature=1.2))])
    assert beside[1].text == first.text
    assert all(answer.text for answer in beside)


def test_the_frequency_penalty_cuts_repeats_and_the_presence_penalty_changes_the_answer(engine):
    plain = alone(engine, CATS, settings())
    assert plain.text.lower().count("cat") >= 8  # the prompt makes the model repeat
    penalised = alone(engine, CATS, settings(frequency_penalty=2.0))
    assert penalised.text != plain.text
    assert penalised.text.lower().count("cat") < plain.text.lower().count("cat")
    assert alone(engine, CATS, settings(presence_penalty=2.0)).text != plain.text
    assert together(engine, [(CATS, settings(frequency_penalty=2.0)), (CAPITAL, settings())])[0].text == penalised.text


def check_logprobs(answer: Answer, count: int, greedy: bool) -> None:
    assert len(answer.logprobs) == answer.tokens > 0  # one for each token
    assert answer.text.startswith(answer.logprobs[0].token)
    for entry in answer.logprobs:
        assert entry.logprob <= 0
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True) and all(value <= 0 for value in values)
        assert sum(math.exp(value) for value in values) <= 1 + 1e-6
        if greedy:  # the whole vocabulary: always `count` of them, the chosen token first
            assert len(entry.top) == count and entry.top[0] == (entry.token, entry.logprob)
        else:  # cut by top-k and top-p: perhaps fewer
            assert 1 <= len(entry.top) <= count


def test_logprobs_greedy_and_sampled_alone_and_in_a_batch(engine, greedy_capital):
    greedy = alone(engine, CAPITAL, settings(logprobs=20))
    assert greedy.text == greedy_capital.text  # reporting changes nothing
    check_logprobs(greedy, 20, greedy=True)
    hot = alone(engine, POEM, sampled(seed=7, logprobs=3))
    assert hot.text == alone(engine, POEM, sampled(seed=7)).text  # the chain draws the same token
    check_logprobs(hot, 3, greedy=False)
    batched, neighbour = together(engine, [(CAPITAL, settings(logprobs=5)), (POEM, sampled())])
    assert batched.text == greedy_capital.text and not neighbour.logprobs
    check_logprobs(batched, 5, greedy=True)
    assert [entry.token for entry in batched.logprobs] == [entry.token for entry in greedy.logprobs]
    assert [e.logprob for e in batched.logprobs] == pytest.approx([e.logprob for e in greedy.logprobs], abs=1e-3)
    assert not greedy_capital.logprobs and alone(engine, CAPITAL, settings(logprobs=0)).logprobs[0].top == ()


def test_a_json_schema_constrains_the_answer_and_nothing_beside_it(engine, greedy_capital):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    constrained = alone(engine, TRIP, settings(json_schema=SCHEMA), max_tokens=48)
    jsonschema.validate(json.loads(constrained.text), SCHEMA)
    assert constrained.reason == "stop"  # the JSON is whole: it ends there
    in_batch, beside = together(engine, [(TRIP, settings(json_schema=SCHEMA)), (CAPITAL, settings())], max_tokens=48)
    jsonschema.validate(json.loads(in_batch.text), SCHEMA)
    assert in_batch.reason == "stop"
    assert beside.text.startswith(greedy_capital.text)  # 48 tokens here, 24 there
    sampled_json = alone(engine, "Describe a city as JSON", sampled(seed=3, json_schema=SCHEMA, logprobs=2), 48)
    jsonschema.validate(json.loads(sampled_json.text), SCHEMA)


def test_a_schema_no_json_matches_is_refused(engine):
    pytest.importorskip("llguidance")
    impossible = {"type": "string", "minLength": 5, "maxLength": 2}
    with pytest.raises(Refused, match="json_schema"):
        alone(engine, TRIP, settings(json_schema=impossible))
    failed, fine = together(engine, [(TRIP, settings(json_schema=impossible)), (CAPITAL, settings())], max_tokens=4)
    assert "json_schema" in (failed.error or "") and fine.text and fine.error is None


TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for tool in tools %}{{ tool.function.name }}{% endfor %}</tools>{% endif %}"
                  "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
                  "{% for call in m.tool_calls or [] %}call {{ call.function.name }}{% endfor %}"
                  "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}{% endfor %}")


def test_tools_and_tool_turns_reach_a_template_that_renders_them(engine, monkeypatch):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
             {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    # The default model's template has no tools: they are not passed (the core renders them into the turns).
    assert (choose_style(engine.chat_template), engine.renders_tools) == ("hermes", False)
    assert engine.encode(turns[:1], tools=[tool]).ids == engine.encode(turns[:1]).ids
    monkeypatch.setattr(engine, "formatter", Jinja2ChatFormatter(TOOLS_TEMPLATE, "", ""))
    monkeypatch.setattr(engine, "renders_tools", True)
    rendered = engine.llama.detokenize(engine.encode(turns, tools=[tool]).ids, special=True).decode()
    assert rendered == "<tools>weather</tools><user>Weather in Paris?<assistant>call weather<tool>sunny for c1"
