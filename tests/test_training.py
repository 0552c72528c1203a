"""Training over the socket: LoRA on the tiny model in the same FIFO, its events buffered like any
answer, the trained model saved in var/models/ (the served one unchanged), and bad datasets refused by line."""
import json
import os
import shutil
import sys

import pexpect
import pytest
from conftest import REPO, Client, inference, text_of

QUESTION = "What is the secret word?"
ANSWER = "The secret word is pineapple, pineapple, pineapple."
LINE = json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]})
FAST = {"max_steps": 24, "batch_size": 2, "learning_rate": 0.01, "log_every": 4, "max_seq_length": 256}


@pytest.fixture(scope="module")
def train_server(start_server, tiny_model):
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny")
    return start_server(None, populate, model={"path": "models/tiny"})


def train(name, dataset="\n".join([LINE] * 4), request_id=None, **config) -> dict:
    return {"type": "train", "dataset": dataset, "checkpoint_name": name, "request_id": request_id or name,
            "config": {**FAST, **config}}


async def test_a_short_lora_run_learns_and_saves_a_model_that_answers_differently(train_server):
    client = await Client.open(train_server.url)
    before = text_of(await client.until_done(inference(QUESTION, max_new_tokens=12)))
    events = await client.until_done(train("secret"), "train_done")
    kinds = [event["type"] for event in events if event["type"] != "queued"]  # the answer before may still end
    assert kinds[0] == "train_started" and kinds[-1] == "train_done", kinds
    progress = [event for event in events if event["type"] == "train_progress"]
    assert [event["step"] for event in progress] == [4, 8, 12, 16, 20, 24]
    assert progress[-1]["loss"] < progress[0]["loss"] / 2  # it learned the repeated line
    assert all(event["tokens_per_s"] > 0 for event in progress)
    done = events[-1]
    assert done["checkpoint"] == "var/models/secret" and done["steps"] == 24 and done["finish_reason"] == "done"
    assert text_of(await client.until_done(inference(QUESTION, max_new_tokens=12))) == before  # served: unchanged
    listed = {entry["name"]: entry for entry in (await client.request({"type": "list_models"}))["models"]}
    assert listed["secret"]["source"] == "var" and listed["secret"]["complete"]
    await client.send({"type": "switch_model", "model_path": "var/models/secret"})
    await client.until("model_switched")
    after = text_of(await client.until_done(inference(QUESTION, max_new_tokens=12)))
    assert after != before
    status = (await client.request({"type": "train_status"}))["training"]
    assert status["running"] is False and status["steps_done"] == 24 and status["checkpoint"] == "var/models/secret"
    await client.send({"type": "switch_model", "model_path": "models/tiny"})
    await client.until("model_switched")
    await client.close()


async def test_training_waits_in_the_fifo_and_a_drop_loses_no_event(train_server):
    client = await Client.open(train_server.url)
    await client.send(train("resumed", max_steps=40))
    await client.until("train_progress")
    await client.send(inference(QUESTION, max_new_tokens=4, request_id="after-training"))
    queued = await client.until("queued")
    assert queued[-1]["position"] == 1 and queued[-1]["request_id"] == "after-training"
    session_id, seen = client.session_id, max(m["seq"] for m in queued)
    await client.ws.close()  # dropped mid-training
    back = await Client.open(train_server.url, {"session_id": session_id, "last_seq": seen})
    rest = await back.until("done")
    assert [m["seq"] for m in rest] == list(range(seen + 1, seen + 1 + len(rest)))  # no gap, no duplicate
    kinds = [m["type"] for m in rest]
    assert kinds.index("train_done") < kinds.index("start")  # the request ran after the training
    await back.close()


async def test_a_cancelled_run_saves_nothing_and_the_served_model_is_intact(train_server):
    client = await Client.open(train_server.url)
    before = text_of(await client.until_done(inference(QUESTION, max_new_tokens=8)))
    await client.send(train("cancelled-run", max_steps=100000))
    await client.until("train_progress")
    await client.send({"type": "cancel", "request_id": "cancelled-run"})
    done = (await client.until("train_done"))[-1]
    assert done["finish_reason"] == "cancelled" and done["checkpoint"] is None
    assert not (train_server.root / "var" / "models" / "cancelled-run").exists()
    assert text_of(await client.until_done(inference(QUESTION, max_new_tokens=8))) == before
    await client.close()


@pytest.mark.parametrize("message, error", [
    (train("bad", dataset=""), "dataset must be JSONL"),
    (train("bad", dataset=LINE + "\n{not json\n"), "dataset line 2: not JSON"),
    (train("bad", dataset=LINE + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})),
     "dataset line 3: must be"),
    (train("bad", max_steps=0), "config: max_steps must be a whole number from 1"),
    (train("bad", warmup=3), "unknown training setting(s) warmup"),
    (train("../escape", request_id="escape"), "checkpoint_name: not a valid model name"),
    ({"type": "train", "resume": True, "request_id": "never-seen"}, "resume: no dataset"),
])
async def test_bad_training_requests_are_refused_naming_what(train_server, message, error):
    client = await Client.open(train_server.url)
    reply = await client.request(message)
    assert reply["type"] == "error" and error in reply["message"], reply
    assert (await client.request({"type": "ping"}))["type"] == "pong"  # the connection stays
    await client.close()


async def test_a_line_too_long_for_max_seq_length_fails_naming_it(train_server):
    client = await Client.open(train_server.url)
    long_line = json.dumps({"text": "river " * 200})
    events = await client.until_done(train("too-long", dataset=LINE + "\n" + long_line, max_seq_length=64))
    assert events[-1]["type"] == "error" and "dataset line 2" in events[-1]["message"]
    assert "max_seq_length 64" in events[-1]["message"]
    await client.close()


async def test_a_snapshot_saves_the_served_model(train_server):
    client = await Client.open(train_server.url)
    await client.send({"type": "save_snapshot", "name": "copy"})
    saved = (await client.until("snapshot_saved", "error"))[-1]
    assert saved["type"] == "snapshot_saved" and saved["path"] == "var/models/copy", saved
    assert (train_server.root / "var" / "models" / "copy" / "config.json").is_file()
    again = await client.request({"type": "save_snapshot", "name": "copy"})
    assert again["type"] == "error" and "exists already" in again["message"]
    await client.close()


def test_the_repl_trains_with_a_progress_bar_and_snapshots(train_server, tmp_path):
    dataset = tmp_path / "secret.jsonl"
    dataset.write_text("\n".join([LINE] * 4))
    repl = pexpect.spawn(sys.executable, [str(REPO / "llm.py"), "--port", str(train_server.port),
                                          "--host", "127.0.0.1"],
                         env={**os.environ, "HOME": str(tmp_path)}, encoding="utf-8", timeout=120)
    repl.expect("you> ")
    repl.sendline(f"/train {dataset} max_steps=8 log_every=4 learning_rate=0.01 checkpoint_name=repl-run")
    repl.expect(r"\[train\] 4 examples, 8 steps")
    repl.expect(r"\[train\] #+ +4/8 loss [\d.]+")
    repl.expect(r"\[train\] done after 8 steps, loss [\d.]+: saved as var/models/repl-run")
    repl.expect("you> ")
    repl.sendline("/switch var/models/repl-run")
    repl.expect("Model switched to repl-run")
    repl.expect("you> ")
    repl.sendline("/snapshot repl-copy")
    repl.expect("saved as var/models/repl-copy")
    repl.expect("you> ")
    repl.sendline("/switch models/tiny")
    repl.expect("Model switched to tiny")
    repl.sendeof()
    repl.expect(pexpect.EOF)
