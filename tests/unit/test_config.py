"""config.json: defaults written when missing, precise errors when malformed, paths relative to the file."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, free_port

from llmws_server.config import DEFAULTS, generation_defaults, load_config, validate_generation
from llmws_server.errors import ConfigError, Refused


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


def test_server_refuses_to_start_on_a_malformed_config(tmp_path):
    file = tmp_path / "config.json"
    file.write_text('{"server": {"port": true}}')
    result = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert str(file) in result.stderr and "server.port" in result.stderr


@pytest.mark.parametrize("config_port, argument, expected", [
    (99999, [], "server.port': must be 1 to 65535"),
    (8765, ["--port", "99999"], "llmws: port 99999 is not a TCP port (1-65535)"),
    (8765, ["--host", "no-such-host.invalid"], "llmws: cannot listen on no-such-host.invalid:"),
])
def test_a_port_or_host_that_cannot_serve_is_refused_before_anything_is_written(tmp_path, config_port, argument,
                                                                              expected):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"server": {"port": config_port}}))
    result = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(file), *argument],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no models/, no var/


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


def test_help_answers_without_loading_the_model_stack_and_shows_the_defaults():
    probe = (f"import runpy, sys\nsys.argv = ['llmws.py', '--help']\ntry:\n"
             f"    runpy.run_path({str(REPO / 'llmws.py')!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "torch not loaded" in shown.stdout
    for default in ("server.port, 8765", "server.http_port, 8000", "server.host, 0.0.0.0", "examples:"):
        assert default in shown.stdout


def test_a_model_path_that_does_not_exist_is_one_line_listing_those_that_do(tmp_path, tiny_model):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine").symlink_to(tiny_model, target_is_directory=True)
    refused = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(tmp_path / "config.json"),
                              "--port", str(free_port()), "--http-port", "0", "--model", "models/nothere"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("Model not found: ")
    assert "(models here: models/mine)" in refused.stderr


def test_a_folder_that_is_no_model_is_one_line_saying_so(tmp_path):
    (tmp_path / "models" / "empty").mkdir(parents=True)
    (tmp_path / "models" / "empty" / "README.md").write_text("not a model")
    refused = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(tmp_path / "config.json"),
                              "--port", str(free_port()), "--http-port", "0", "--model", "models/empty"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("Model not found: ") and "has no config.json and no .gguf file" in refused.stderr


def test_a_model_bigger_than_free_memory_is_one_line_before_anything_is_loaded(tmp_path, tiny_model):
    """A real folder whose safetensors file declares more float32 weights than this machine has (a sparse
    file: its header is real, its data takes no disk)."""
    import shutil
    import struct

    import psutil

    big = tmp_path / "models" / "too-big"
    shutil.copytree(tiny_model, big)
    elements = psutil.virtual_memory().total  # x 4 bytes of float32: four times the RAM
    header = json.dumps({"embed": {"dtype": "F32", "shape": [elements], "data_offsets": [0, elements * 4]}}).encode()
    with (big / "model.safetensors").open("wb") as weights:
        weights.write(struct.pack("<Q", len(header)) + header)
        weights.truncate(8 + len(header) + elements * 4)
    refused = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(tmp_path / "config.json"),
                              "--port", str(free_port()), "--http-port", "0", "--model", str(big)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (refused.stderr.startswith("llmws: too-big needs about ")
            and " GB is free: pick a smaller model" in refused.stderr)


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
    ({"num_cpus": 0}, False), ({"num_gpus": -1}, False), ({"max_restarts": -1}, False)])
def test_replicas_settings_are_checked(tmp_path, replicas, accepted):
    (tmp_path / "config.json").write_text(json.dumps({"replicas": replicas}))
    if accepted:
        assert load_config(tmp_path / "config.json").replicas.items() >= replicas.items()
    else:
        with pytest.raises(ConfigError, match="replicas." + next(iter(replicas))):
            load_config(tmp_path / "config.json")
