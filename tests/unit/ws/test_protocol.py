"""The pure parts without a socket or a model: request validation, generation settings, the catalog's
folder rules, and the workers' order of admission against a scripted engine (engines.api's interface)."""
import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from llmws_server.catalog import folders as catalog
from llmws_server.config import DEFAULTS, GenerationSettings, load_config
from llmws_server.core import events
from llmws_server.core.batching import BatchingWorker
from llmws_server.core.jobs import InferenceJob, Job, SwitchJob
from llmws_server.core.requests import MAX_DEPTH, parse_json
from llmws_server.core.worker import Worker
from llmws_server.engines.api import Progress, Prompt
from llmws_server.errors import ContextTooLong, Refused
from llmws_server.http import openai_shapes, runs
from llmws_server.http.errors import APIError
from llmws_server.ws import protocol, wire

DEFAULT_SETTINGS = DEFAULTS["generation_defaults"]


# -- protocol ---------------------------------------------------------------------------------------------

def test_an_inference_request_carries_its_turns_and_its_settings_over_the_sessions():
    message = {"type": "inference", "prompt": {"system": "Be brief", "user": "Hi"}, "request_id": "r-1",
               "config": {"temperature": 0, "max_new_tokens": 7}}
    request = protocol.inference_request(message, DEFAULT_SETTINGS)
    assert request.turns == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    assert request.request_id == "r-1"
    assert request.settings == GenerationSettings(**{**DEFAULT_SETTINGS, "temperature": 0, "max_new_tokens": 7})
    assert not request.settings.sampled and not request.settings.penalized  # the fallback: no penalty


@pytest.mark.parametrize("config, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"max_new_tokens": 1.5}, "max_new_tokens"), ({"seed": -1}, "seed"),
                                           ({"sampling_seed": 1}, "sampling_seed"),
                                           ({"presence_penalty": 3}, "presence_penalty"),
                                           ({"do_sample": 1}, "do_sample"), ({"top_k": 2 ** 40}, "top_k")])
def test_a_bad_setting_is_refused_naming_its_field(config, field):
    message = {"type": "inference", "prompt": "Hi", "config": config}
    with pytest.raises(Refused, match=f"^config: .*{field}"):
        protocol.inference_request(message, DEFAULT_SETTINGS)


@pytest.mark.parametrize("temperature, do_sample, sampled", [(0, True, False), (0.7, False, False), (0.7, True, True)])
def test_greedy_is_temperature_zero_or_do_sample_false(temperature, do_sample, sampled):
    settings = GenerationSettings(**{**DEFAULT_SETTINGS, "temperature": temperature, "do_sample": do_sample})
    assert settings.sampled is sampled


def test_every_outgoing_message_has_its_documented_type():
    protocol_doc = (REPO / "docs" / "protocol.md").read_text()
    built = [protocol.welcome("s", False, "m", {}, {}, {}), protocol.log("x"), protocol.error("x"), protocol.queued(1),
             protocol.start(1, 2, 0, False), protocol.token("x"), protocol.done(3, "stop", 6.0),
             wire.message(events.Failed(str(ContextTooLong(9, 8)), ContextTooLong(9, 8).fields)),
             protocol.config_ack({}), protocol.ack_received(),
             protocol.cancelled("r"), protocol.resources(None, {}, {}, []), protocol.models_list([]),
             protocol.model_switched("m", {}), protocol.pong(), protocol.status({}, None, 1, {}),
             protocol.recheck_complete(True, {}, "unchanged"), protocol.train_started({}, 1, "x"),
             protocol.train_progress(1, 2, 0.5, 1e-4, 10.0), protocol.train_checkpoint(1, "p"),
             protocol.train_done(1, None, "done", 0.5), protocol.train_status({}), protocol.snapshot_saved("p"),
             protocol.download_started(), protocol.download_done({}),
             protocol.model_deleted("m")]
    for message in built:
        kind = message["type"]
        assert f"`{kind}`" in protocol_doc or f'"type": "{kind}"' in protocol_doc.replace('":"', '": "'), kind
    assert events.done(3, events.FinishReason.STOP, 0.5).tokens_per_s == 6.0


# -- catalog ----------------------------------------------------------------------------------------------

@pytest.fixture()
def folders(tmp_path):
    config = load_config(tmp_path / "config.json")
    for name in ("mine", "loaded"):
        (config.paths["var_dir"] / "models" / name).mkdir(parents=True)
    (config.paths["models_dir"] / "operators").mkdir(parents=True)
    (config.paths["var_dir"] / "models" / "link").symlink_to(config.paths["models_dir"] / "operators")
    return config


def test_the_catalog_deletes_only_unloaded_folders_of_var_models(folders):
    loaded = folders.paths["var_dir"] / "models" / "loaded"
    for name, refusal in [("operators", "deleted manually"), ("loaded", "is loaded"), ("link", "not found"),
                          ("../models", "not a valid model name"), ("nothing", "not found")]:
        with pytest.raises(Refused, match=refusal):
            catalog.delete(folders, name, loaded)
    assert (folders.paths["models_dir"] / "operators").is_dir() and loaded.is_dir()
    assert catalog.delete(folders, "mine", loaded) == "mine"
    assert not (folders.paths["var_dir"] / "models" / "mine").exists()


# -- the workers against a scripted engine ----------------------------------------------------------------

class ScriptedBatch:
    """Each request gains one token per look and finishes at its max_tokens; the log says when."""

    def __init__(self, engine):
        self.engine, self.requests, self.added = engine, {}, 0

    def add(self, prompt, max_tokens, settings):
        name = f"request-{self.added}"
        self.added += 1
        self.requests[name] = [prompt.ids[0], 0, max_tokens]
        kind = "sampled" if settings.sampled else "greedy"
        self.engine.events.append(("add", prompt.ids[0], kind + (" penalised" if settings.penalized else "")))
        return name

    def cancel(self, request):
        self.requests.pop(request)

    def progress(self, timeout):
        time.sleep(timeout)
        found = []
        for name, state in list(self.requests.items()):
            state[1] += 1
            finished = state[1] >= state[2]
            if finished:
                self.requests.pop(name)
                self.engine.events.append(("end", state[0]))
            found.append(Progress(name, "x", state[1], finished))
        return found

    def failure(self):
        return None

    def close(self):
        self.engine.events.append(("close",))


class ScriptedEngine:
    """Prompts are one token, the request's number; every request batches."""
    name, path, vision, max_context, params, device, dtype_name = "scripted", Path("x"), False, 100, 1, "cpu", "-"
    chat_template = None

    def __init__(self):
        self.events = []

    def encode(self, messages, tools=None):
        return Prompt([int(messages[-1]["content"])])

    def batchable(self, images):
        return not images

    def open_batch(self, slots):
        self.events.append(("open", slots))
        return ScriptedBatch(self)

    def generate(self, prompt, settings, max_new_tokens, on_text, should_stop):
        self.events.append(("alone", prompt.ids[0]))
        on_text("x")
        return 1, "stop"

    def is_out_of_memory(self, exc):
        return False


class Recorder:
    """A session: it keeps what the jobs emit, and says when every request has ended."""

    def __init__(self, expected):
        self.messages, self.expected, self.all_done = [], expected, threading.Event()

    def emit(self, stamped):
        message = wire.CODEC.encode(stamped)
        self.messages.append(message)
        if sum(m["type"] in ("done", "error") for m in self.messages) == self.expected:
            self.all_done.set()


@pytest.fixture()
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def job(session, loop, number, max_tokens=3, **settings):
    message = {"type": "inference", "prompt": str(number), "request_id": f"r{number}",
               "config": {"repetition_penalty": 1.0, "temperature": 0, "max_new_tokens": max_tokens, **settings}}
    return InferenceJob(session, loop, protocol.inference_request(message, DEFAULT_SETTINGS), 60)


class AloneJob(Job):
    """A job that is not a request (as a model switch): it runs alone, and says so in the log."""

    def __init__(self, session, loop, engine, number):
        super().__init__(session, loop)
        self.engine, self.number = engine, number

    def run(self, worker):
        self.engine.events.append(("alone", self.number))
        self.emit(events.done(0, events.FinishReason.STOP, 0.0))


def test_the_batch_admits_in_order_and_nothing_passes_a_job_that_waits(event_loop_thread):
    """1-3 share the open batch whatever their settings (greedy, sampled, penalised); 4 must run alone,
    so it waits for them to drain, and 5 may not pass it; after 4, 5 and 6 share a batch again."""
    loop, engine = event_loop_thread, ScriptedEngine()
    session = Recorder(6)
    worker = BatchingWorker(engine, 4)
    jobs = [job(session, loop, 1), job(session, loop, 2, max_tokens=5, temperature=0.7),
            job(session, loop, 3, repetition_penalty=1.2), AloneJob(session, loop, engine, 4),
            job(session, loop, 5), job(session, loop, 6, temperature=0.7, repetition_penalty=1.1)]
    for each in jobs:  # queued before the worker starts: all of them are there at its first look
        worker.submit(each)
    worker.start(loop)
    assert session.all_done.wait(10)
    worker.stop()
    assert engine.events == [("open", 4), ("add", 1, "greedy"), ("add", 2, "sampled"),
                             ("add", 3, "greedy penalised"), ("end", 1), ("end", 3), ("end", 2), ("close",),
                             ("alone", 4), ("open", 4), ("add", 5, "greedy"), ("add", 6, "sampled penalised"),
                             ("end", 5), ("end", 6), ("close",)]
    done = [m for m in session.messages if m["type"] == "done"]
    assert sorted(m.get("request_id") or "alone" for m in done) == ["alone", "r1", "r2", "r3", "r5", "r6"]
    assert {m["request_id"]: m["total_tokens"] for m in done if m.get("request_id")} == {
        "r1": 3, "r2": 5, "r3": 3, "r5": 3, "r6": 3}


def test_stopping_during_a_model_switch_ends_cleanly(event_loop_thread):
    """The worker cancels whatever job runs at shutdown, a model switch included."""
    loop, engine, loading = event_loop_thread, ScriptedEngine(), threading.Event()
    engine.unload = lambda: None

    def slow_load(path):
        loading.set()
        time.sleep(0.5)
        return engine

    session = Recorder(1)
    worker = Worker(engine)
    worker.start(loop)
    worker.submit(SwitchJob(session, loop, Path("other"), slow_load, lambda new: events.ModelLoaded(new.name, {}),
                            lambda new, failure: None))
    assert loading.wait(5)
    worker.stop()
    assert not worker.thread.is_alive()


# -- the OpenAI API's stop strings ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_strings_cut_the_text_at_the_first_complete_one_however_it_streams(text, cuts, stops):
    """Streamed in any pieces, the text sent is the text before the stop string complete first (the longer
    where two end together), or all of it."""
    found = [(index + len(stop), index) for stop in stops if (index := text.find(stop)) >= 0]
    expected = text[:min(found)[1]] if found else text
    watch, sent = runs.StopText(tuple(stops)), []
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    for start, end in zip(bounds, bounds[1:]):
        if not watch.stopped:
            sent.append(watch.feed(text[start:end]))
    if not watch.stopped:
        sent.append(watch.rest())
    assert "".join(sent) == expected and watch.stopped == bool(found)


def test_a_stop_string_complete_first_wins_over_a_longer_one_that_began_earlier():
    """"ba" streams before "b  ": the model stops at "a", the text after it is never generated."""
    for pieces in (["bab  "], ["ba", "b  "], ["b", "a", "b", "  "]):
        watch = runs.StopText(("bab", "a"))
        assert "".join(watch.feed(piece) for piece in pieces if not watch.stopped) == "b" and watch.stopped


def test_openai_settings_map_onto_the_servers_and_unsupported_ones_are_refused():
    body = {"messages": [{"role": "developer", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0, "stop": "\n", "user": "ignored", "n": 1, "seed": None}
    request = openai_shapes.chat_request(body, DEFAULT_SETTINGS)
    assert request.inference.turns[0] == {"role": "system", "content": "Be brief"}
    assert request.inference.settings.max_new_tokens == 5 and request.stop == ("\n",) and not request.stream
    with pytest.raises(APIError) as refused:
        openai_shapes.chat_request({**body, "tools": [{"type": "function"}]}, DEFAULT_SETTINGS)
    assert refused.value.param == "tools" and refused.value.status == 400
    with pytest.raises(APIError, match="max_tokens must be >= 1"):
        openai_shapes.chat_request({**body, "max_tokens": 0}, DEFAULT_SETTINGS)


# -- llm.py's terminal view ------------------------------------------------------------------------

@pytest.mark.parametrize("text, end", [
    ("", 0), ("A sentence being writ", 0), ("One.\n", 0), ("One.\n\nTwo", 6),
    ("```python\nx = 1\n\ny = 2\n", 0),                     # a blank line inside code settles nothing
    ("Intro\n\n```python\nx = 1\n```\nAfter", 27),         # a closed code block is settled
    ("A\n\nB\n\n```\nopen", 6),
])
def test_settled_markdown_ends_after_a_blank_line_or_a_closed_code_block(text, end):
    from llm_view import settled
    assert settled(text) == end


def test_the_markdown_view_renders_and_shows_nothing_after_stop():
    import io
    import re

    from rich.console import Console

    from llm_view import MarkdownView

    out = io.StringIO()
    view = MarkdownView(Console(file=out, force_terminal=True, width=60, color_system="standard"))
    view.status("queued: 2 ahead")
    text = "Some **bold** text.\n\n```python\nprint(1)\n```\nAfter that\n- a\n- b"
    for start in range(0, len(text), 3):
        view.add(text[start:start + 3])
    view.stop()
    view.add("LEAKED")
    view.finish("[9 tokens, 1.0 tokens/s]")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "queued: 2 ahead" in shown and "Some bold text." in shown and "print(1)" in shown and "• b" in shown
    assert "**" not in shown and "```" not in shown and "LEAKED" not in shown
    assert shown.rstrip().endswith("[9 tokens, 1.0 tokens/s]")


# -- the protocol's oracle: every inbound message is accepted whole or refused naming what is wrong ----------

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 4400) |
                        st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                        max_leaves=6)
SETTING_NAMES = ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "do_sample", "beam"]
INFERENCE_FIELDS = {
    "type": st.just("inference"),
    "prompt": st.text(max_size=20) | st.fixed_dictionaries({"user": st.text(max_size=8)}) | ANY_JSON,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"])
                                                | ANY_JSON,
                                                "content": st.text(max_size=8) | ANY_JSON}), max_size=3) | ANY_JSON,
    "config": st.dictionaries(st.sampled_from(SETTING_NAMES), ANY_JSON | st.floats(0, 3) | st.integers(0, 50),
                              max_size=3) | ANY_JSON,
    "request_id": st.from_regex(r"[\w.:-]{1,20}", fullmatch=True) | ANY_JSON,
    "colour": ANY_JSON,  # a field inference does not have
}


def names_in(value) -> set[str]:
    """Every key of the message and of the objects inside it: what a refusal may name."""
    if isinstance(value, dict):
        return set(value) | set().union(*(names_in(inner) for inner in value.values()))
    if isinstance(value, list):
        return set().union(*(names_in(inner) for inner in value))
    return set()


@settings(max_examples=1500, deadline=None)
@given(message=st.fixed_dictionaries({"type": INFERENCE_FIELDS["type"]},
                                     optional={key: value for key, value in INFERENCE_FIELDS.items() if key != "type"})
       | st.fixed_dictionaries({"type": INFERENCE_FIELDS["type"], "prompt": st.text(min_size=1, max_size=20)},
                               optional={"config": INFERENCE_FIELDS["config"]}))
def test_an_inference_message_is_accepted_whole_or_refused_naming_the_field(message):
    try:
        protocol.check_message(message)
        request = protocol.inference_request(message, DEFAULTS["generation_defaults"] or
                                             {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0,
                                              "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0})
    except Refused as refusal:
        text = str(refusal)
        named = names_in(message) | {"prompt or messages"}
        assert any(name and name in text for name in named), (text, message)
        return
    assert request.turns and all(turn["role"] in ("system", "user", "assistant") for turn in request.turns)


@settings(max_examples=800, deadline=None)
@given(data=st.dictionaries(st.sampled_from(SETTING_NAMES), ANY_JSON, max_size=3) | ANY_JSON)
def test_a_config_update_is_accepted_whole_or_refused_naming_the_setting(data):
    try:
        update = protocol.settings_update(data, "data")
    except Refused as refusal:
        text = str(refusal)
        assert text.startswith("data"), text
        if isinstance(data, dict) and data:
            assert any(name in text for name in data), (text, data)
        return
    assert isinstance(data, dict) and set(update) <= set(data)


def test_json_nested_16_levels_is_read_and_17_is_refused():
    def nested(levels):
        return '{"type": "ack", "x":' + '{"a":' * (levels - 1) + "1" + "}" * levels

    assert parse_json(nested(MAX_DEPTH))["type"] == "ack"
    with pytest.raises(Refused, match="nested too deeply"):
        parse_json(nested(MAX_DEPTH + 1))


def test_a_session_takes_a_request_id_s_frame_once_unless_it_was_refused(tmp_path):
    from llmws_server.sessions.file_buffer import FileBuffer
    from llmws_server.sessions.store import TAKEN_KEPT, Session

    session = Session("s", FileBuffer(tmp_path, "s"), wire.CODEC, {})
    assert not session.is_a_retry("r1", "frame a")
    session.take("r1", "frame a")
    assert session.is_a_retry("r1", "frame a") and not session.is_a_retry("r1", "frame b")
    session.untake("r1", session.take("r1", "frame b"))  # another frame with its id, refused
    assert session.is_a_retry("r1", "frame a")
    session.untake("r2", session.take("r2", "frame c"))  # refused: sent again, it may run
    assert not session.is_a_retry("r2", "frame c")
    for number in range(TAKEN_KEPT):
        session.take(f"later-{number}", "frame")
    assert not session.is_a_retry("r1", "frame a") and len(session.taken) == TAKEN_KEPT  # the oldest forgotten
