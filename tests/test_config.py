"""config.json at a real start of llmws.py: a malformed file, a port or host that cannot serve, --help, a model
path that is no model or too big for the memory, each refused in one line before anything is written or loaded.
The config module's own rules are tests/unit/test_config.py."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, free_port


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
