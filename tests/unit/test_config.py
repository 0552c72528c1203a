"""config.json: defaults written when missing, precise errors when malformed, paths relative to the file."""
import json

import pytest
from conftest import REPO

from llmws_server.config import DEFAULTS, GenerationSettings, generation_defaults, load_config, validate_generation
from llmws_server.errors import ConfigError, Refused

DEFAULT_SETTINGS = DEFAULTS["generation_defaults"]


def test_repo_config_has_every_key_of_the_contract():
    """Every key at its default, but generation settings: those are left to the model."""
    shipped = json.loads((REPO / "config.json").read_text())
    assert shipped == {**DEFAULTS, "generation_defaults": {}}


def test_missing_config_is_written_with_defaults(tmp_path):
    config = load_config(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == {**DEFAULTS, "generation_defaults": {}}
    assert config.server["port"] == 8765
    assert config.paths["sessions_dir"] == tmp_path / "var" / "sessions"


def test_partial_config_is_merged_over_defaults_and_paths_resolve_against_its_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    file = tmp_path / "sub" / "config.json"
    file.write_text(json.dumps({"server": {"port": 9000}, "paths": {"models_dir": "../weights"}}))
    config = load_config(file)
    assert config.server["port"] == 9000 and config.server["host"] == "0.0.0.0"
    assert config.paths["models_dir"] == tmp_path / "weights"


@pytest.mark.parametrize("text, expected", [
    ('{\n  "server": {\n    "port": 80,\n  }\n}', ["line 4", "invalid JSON"]),
    ('{\n  "server": {\n    "port": "eighty"\n  }\n}', ["line 3", "server.port", "number"]),
    ('{\n  "limits": {\n    "max_clientz": 3\n  }\n}', ["line 3", "limits.max_clientz", "unknown key"]),
    ('{\n  "generation_defaults": {\n    "top_p": 2\n  }\n}', ["line 3", "generation_defaults.top_p"]),
    ('{\n  "optimization": {\n    "dtype": "int3"\n  }\n}', ["line 3", "optimization.dtype"]),
    ('{\n  "limits": {\n    "stream_resume_s": -1\n  }\n}', ["line 3", "limits.stream_resume_s", "0 or more"]),
])
def test_malformed_config_names_file_line_and_key(tmp_path, text, expected):
    file = tmp_path / "config.json"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    message = str(caught.value)
    assert str(file) in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("settings, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"do_sample": 1}, "do_sample"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"colour": 1}, "colour"),
])
def test_generation_settings_out_of_range_are_refused(settings, field):
    with pytest.raises(Refused, match=field):
        validate_generation(settings)


def test_generation_settings_in_range_pass():
    settings = {"temperature": 0, "top_p": 1, "top_k": 0, "max_new_tokens": 1, "repetition_penalty": 1.0,
                "do_sample": False}
    assert validate_generation(dict(settings)) == settings


@pytest.mark.parametrize("temperature, do_sample, sampled", [(0, True, False), (0.7, False, False), (0.7, True, True)])
def test_greedy_is_temperature_zero_or_do_sample_false(temperature, do_sample, sampled):
    settings = GenerationSettings(**{**DEFAULT_SETTINGS, "temperature": temperature, "do_sample": do_sample})
    assert settings.sampled is sampled


def test_generation_defaults_come_from_config_json_then_the_model_then_the_built_in_ones(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 20, "top_p": 7, "max_length": 20, "eos_token_id": 2}))  # top_p 7: not taken
    (tmp_path / "config.json").write_text(json.dumps({"generation_defaults": {"top_k": 5}}))
    settings = generation_defaults(load_config(tmp_path / "config.json"), model)
    assert settings == {**DEFAULTS["generation_defaults"], "temperature": 0.3, "top_k": 5}
    assert generation_defaults(load_config(tmp_path / "config.json"), tmp_path / "nothing") == {
        **DEFAULTS["generation_defaults"], "top_k": 5}


@pytest.mark.parametrize("value, accepted", [("auto", True), (1, True), (64, True), (0, False), ("many", False),
                                             (2.5, False), (True, False)])
def test_max_batch_size_is_auto_or_a_whole_number(tmp_path, value, accepted):
    (tmp_path / "config.json").write_text(json.dumps({"optimization": {"max_batch_size": value}}))
    if accepted:
        assert load_config(tmp_path / "config.json").optimization["max_batch_size"] == value
    else:
        with pytest.raises(ConfigError, match="optimization.max_batch_size"):
            load_config(tmp_path / "config.json")


@pytest.mark.parametrize("replicas, accepted", [
    ({"ray_address": "local", "count": 3, "num_cpus": 0.5, "num_gpus": 1}, True),
    ({"ray_address": "ray://10.0.0.2:10001", "max_restarts": 0}, True),
    ({"ray_address": 5}, False), ({"ray_address": ""}, False), ({"count": 0}, False), ({"count": 1.5}, False),
    ({"num_cpus": 0}, False), ({"num_gpus": -1}, False), ({"max_restarts": -1}, False),
    ({"resources": {"llmws": 1}}, True), ({"resources": [{"node_a": 1}, {"node_b": 0.5}], "count": 2}, True),
    ({"resources": [{"node_a": 1}], "count": 2}, False), ({"resources": {"llmws": 0}}, False),
    ({"resources": {"CPU": 1}}, False), ({"resources": ["node_a", "node_b"]}, False), ({"resources": "a"}, False)])
def test_replicas_settings_are_checked(tmp_path, replicas, accepted):
    (tmp_path / "config.json").write_text(json.dumps({"replicas": replicas}))
    if accepted:
        assert load_config(tmp_path / "config.json").replicas.items() >= replicas.items()
    else:
        with pytest.raises(ConfigError, match="replicas." + next(iter(replicas))):
            load_config(tmp_path / "config.json")


def test_the_default_hello_timeout_is_short():
    assert DEFAULTS["limits"]["hello_timeout_s"] <= 10


def test_http_port_0_or_null_in_the_file_is_no_http_api_and_out_of_range_is_refused(tmp_path):
    file = tmp_path / "config.json"
    for value in (0, None):
        file.write_text(json.dumps({"server": {"http_port": value}}))
        assert load_config(file).server["http_port"] is None
    for value in (70000, -1):
        file.write_text(json.dumps({"server": {"http_port": value}}))
        with pytest.raises(ConfigError, match=r"server.http_port': must be 1 to 65535 \(or 0 or null"):
            load_config(file)
