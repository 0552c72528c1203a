"""catalog/default_model.py: what it installs in models/ (conftest's default_model fixture runs it) is the
safetensors model with its tokenizer, not quantised."""
import json


def test_default_model_is_safetensors_with_tokenizer(default_model):
    assert (default_model / "model.safetensors").stat().st_size > 100 * 1024 ** 2
    assert json.loads((default_model / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((default_model / "config.json").read_text())
    assert (default_model / "tokenizer.json").is_file()
