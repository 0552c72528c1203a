"""ws/protocol.py without a socket: an inference message read into a request, a bad setting refused by name,
every outgoing message of a documented type, and the oracle: any inbound message is accepted whole or refused
naming what is wrong."""
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from llmws_server.config import DEFAULTS, GenerationSettings
from llmws_server.core import events
from llmws_server.errors import ContextTooLong, Refused
from llmws_server.ws import protocol, wire

DEFAULT_SETTINGS = DEFAULTS["generation_defaults"]


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
