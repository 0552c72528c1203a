"""End to end with the real default model, SmolLM2-135M-Instruct, converted from the GGUF file on PyPI."""
import shutil

import pytest
from conftest import Client, text_of

QUESTION = {"type": "inference", "prompt": {"user": "What is the capital of France?"},
            "config": {"temperature": 0, "max_new_tokens": 40}}


@pytest.fixture(scope="module")
def real_server(start_server, default_model):
    return start_server(default_model)


async def test_greedy_answer_names_paris_and_survives_a_drop(real_server):
    client = await Client.open(real_server.url)
    assert client.welcome["model"] == "SmolLM2-135M-Instruct"
    assert client.welcome["capabilities"]["max_context"] == 8192  # capped by the model's positions
    await client.send(QUESTION)
    whole = await client.until("done")
    answer = text_of(whole)
    assert "Paris" in answer and whole[-1]["finish_reason"] == "stop"

    await client.send(QUESTION)
    received = [await client.recv() for _ in range(4)]  # start and three tokens, then the line goes dead
    await client.ws.close()
    client = await Client.open(real_server.url, {"session_id": client.session_id, "last_seq": received[-1]["seq"]})
    received += await client.until("done")
    assert text_of(received) == answer
    await client.close()


async def test_startup_log_names_model_device_dtype_and_attention(real_server):
    out = real_server.output()
    assert "SmolLM2-135M-Instruct" in out and "device cpu" in out and "dtype float32" in out
    assert "attention sdpa" in out


def test_auto_select_prefers_models_over_var_models(start_server, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("autoselect")
    shutil.copytree(tiny_model, root / "var" / "models" / "a-var-model")
    shutil.copytree(tiny_model, root / "models" / "z-models-model")
    from conftest import ServerProcess
    server = ServerProcess(root, None, {})
    try:
        assert "loaded z-models-model" in server.output()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_first_start_in_an_empty_folder_installs_the_default_model_and_says_how_far_it_is(tmp_path_factory):
    """What a new user's first `python llmws.py` does: fetch, convert with progress, serve."""
    from conftest import ServerProcess
    root = tmp_path_factory.mktemp("first-start")
    server = ServerProcess(root, None, {})
    try:
        out = server.output()
        steps = ["reading the tokenizer from the GGUF (1/4)", "reading and de-quantising the weights (2/4)",
                 "building the float32 model (3/4)", "writing safetensors (4/4)"]
        for step in steps:  # each step announced when it starts and when it ends
            assert f"{step} ..." in out and f"{step}: done in " in out
        assert out.index(steps[0]) < out.index(steps[1]) < out.index(steps[2]) < out.index(steps[3])
        assert "installed the default model in" in out and "loaded SmolLM2-135M-Instruct" in out
        assert (root / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
        assert (root / "models" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        assert not list((root / "models").glob(".installing-*"))  # the work folder is gone
    finally:
        server.stop()
