"""The original LLMWS's users move over: its config.json, its messages (ping, get_status, recheck_model, a
frame without type) and the fields its clients read."""
import json
import shutil

import pytest
from conftest import Client, inference, text_of

ORIGINAL_RUN_TIME_KEYS = {"name": "Qwen2.5-VL-7B-Instruct", "params": "8.29B", "max_context": 32768,
                          "last_loaded": "/home/user/llmws/models/Qwen2.5-VL-7B-Instruct", "status": "OK",
                          "error": None}


@pytest.fixture(scope="module")
def original_server(start_server, tiny_model):
    """Started from a config.json as the original writes it after a load, serving models/tiny."""
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny")
    return start_server(None, populate, model={**ORIGINAL_RUN_TIME_KEYS, "path": "models/tiny",
                                               "trust_remote_code": True},
                        paths={"datasets_dir": "var/datasets"})


async def test_its_config_json_loads_with_a_line_per_key_read_past(original_server):
    output = original_server.output()
    for key in [f"model.{name}" for name in ORIGINAL_RUN_TIME_KEYS] + ["paths.datasets_dir"]:
        assert f"config.json: {key} is the original LLMWS's and is not used here" in output
    client = await Client.open(original_server.url)
    assert client.welcome["model"] == "tiny"  # model.path is used; last_loaded and name are not
    await client.close()


async def test_ping_status_and_the_fields_its_clients_read(original_server):
    client = await Client.open(original_server.url)
    welcome = client.welcome
    assert welcome["training"]["running"] is False and welcome["capabilities"]["sdpa"] is True
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}
    await client.send({"type": "get_status"})
    status = await client.recv()
    listed = (await client.request({"type": "list_models"}))["models"]
    assert status["type"] == "status" and status["sessions"] >= 1 and status["memory"] is None  # no GPU here
    assert status["model"] == {"loaded": True, "status": "OK", "name": "tiny", "path": "models/tiny", "error": None,
                               "params": status["model"]["params"],
                               "max_context": welcome["capabilities"]["max_context"]}
    assert status["model"]["params"].endswith("B") and [m["path"] for m in listed if m["loaded"]] == ["models/tiny"]
    messages = await client.until_done(inference("Hi", max_new_tokens=3, temperature=0.5))
    start = next(m for m in messages if m["type"] == "start")
    assert start["do_sample"] is True and start["multimodal"] is False
    await client.close()


async def test_a_frame_without_type_is_an_inference_first_or_later(original_server):
    client = await Client.open(original_server.url)
    answer = await client.until_done({"prompt": {"user": "Hi"}, "config": {"temperature": 0, "max_new_tokens": 5}})
    assert answer[-1]["type"] == "done" and answer[-1]["total_tokens"] == 5
    await client.close()
    first = await Client.open(original_server.url, {"prompt": "<|user|>Hi<|end|>",
                                                    "config": {"temperature": 0, "max_new_tokens": 5}})
    assert first.welcome["type"] == "welcome"
    assert text_of(await first.until("done")) == text_of(answer)  # the same request, sent as the first frame
    await first.close()


async def test_recheck_reloads_only_when_the_files_changed(original_server):
    client = await Client.open(original_server.url)
    unchanged = await client.request({"type": "recheck_model"})
    assert unchanged["type"] == "recheck_complete" and unchanged["outcome"] == "unchanged" and unchanged["success"]
    config_file = original_server.root / "models" / "tiny" / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "note": "restored"}))
    await client.send({"type": "recheck_model"})
    messages = await client.until("recheck_complete", "error")
    assert messages[-1]["outcome"] == "reloaded" and messages[-1]["status"]["name"] == "tiny"
    assert any("Loading model tiny" in m.get("message", "") for m in messages if m["type"] == "log")
    await client.send({"type": "switch_model", "model_path": "models/tiny"})
    switched = (await client.until("model_switched", "error"))[-1]
    assert switched["status"]["status"] == "OK" and switched["status"]["path"] == "models/tiny"
    await client.close()
