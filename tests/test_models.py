"""Model management over the socket: list, switch, download (real git + git-lfs), delete; hostile input."""
import asyncio
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import Client, build_tiny_model, inference, text_of
from git_repos import gated_git, gated_path, lfs_repo_of, until_exists

from llm import LLMWSEnhancedClient, LLMWSError
from llmws_server.config import DEFAULTS

POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 1234\n".format("0" * 64)


@pytest.fixture(scope="module")
def second_tiny_model(default_model, tmp_path_factory):
    return build_tiny_model(default_model, tmp_path_factory.mktemp("tiny2") / "tiny-b", seed=1)


@pytest.fixture(scope="module")
def lfs_repo(tiny_model, tmp_path_factory) -> Path:
    """A bare git repository on disk whose safetensors are LFS objects, as on Hugging Face."""
    base = tmp_path_factory.mktemp("repos")
    shutil.copytree(tiny_model, base / "work")
    return lfs_repo_of(base / "work", base / "tiny-lfs.git")


@pytest.fixture(scope="module")
def git_gates(tmp_path_factory) -> Path:
    return gated_git(tmp_path_factory.mktemp("gated-git"))


@pytest.fixture(scope="module")
def models_server(start_server, tiny_model, second_tiny_model, lfs_repo, git_gates):
    def populate(root):
        shutil.copytree(tiny_model, root / "models" / "tiny-a")
        shutil.copytree(second_tiny_model, root / "var" / "models" / "tiny-b")
        shutil.copytree(tiny_model, root / "var" / "models" / "spare")
        broken = root / "var" / "models" / "broken"
        shutil.copytree(tiny_model, broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 4096)  # not a safetensors file
        pointers = root / "var" / "models" / "half-done"
        shutil.copytree(tiny_model, pointers)
        (pointers / "model.safetensors").write_text(POINTER)
        (root / "models" / ".download-x-123").mkdir(parents=True)
        (root / "outside").mkdir()
        (root / "outside" / "keep.txt").write_text("keep")
        os.symlink(root / "outside", root / "var" / "models" / "escape")
    return start_server(None, populate, environment={"PATH": gated_path(git_gates)},
                        download={"allowed_url_prefixes": ["https://huggingface.co/", f"file://{lfs_repo.parent}/"]})


def tree(root: Path) -> set:
    return {str(path.relative_to(root)) for path in root.rglob("*") if "sessions" not in path.parts
            and "logs" not in path.parts}


async def answer(client, text="Which model are you?"):
    await client.send(inference(text, max_new_tokens=12))
    return text_of(await client.until("done"))


async def test_catalogue_lists_both_folders_with_details(models_server):
    client = await Client.open(models_server.url)
    models = {m["name"]: m for m in (await client.request({"type": "list_models"}))["models"]}
    assert set(models) == {"tiny-a", "tiny-b", "spare", "broken", "half-done"}  # hidden work folders are not models
    assert models["tiny-a"] == {**models["tiny-a"], "path": "models/tiny-a", "source": "models", "loaded": True,
                                "architecture": "LlamaForCausalLM", "vision": False, "complete": True}
    assert models["tiny-b"]["source"] == "var" and models["tiny-b"]["loaded"] is False
    assert models["tiny-a"]["size_mb"] > 1
    assert models["half-done"]["complete"] is False and "pointers" in models["half-done"]["problem"]
    resources = await client.request({"type": "get_resources"})
    assert resources["available_models"] == list(models.values())
    await client.close()


async def test_switch_streams_logs_and_answers_come_from_the_new_model(models_server):
    client = await Client.open(models_server.url)
    watcher = await Client.open(models_server.url)
    before = await answer(client)
    await client.send({"type": "switch_model", "model_path": "var/models/tiny-b"})
    messages = await client.until("model_switched", "error")
    logs = [m["message"] for m in messages if m["type"] == "log"]
    assert logs[0] == "Unloading tiny-a..." and "Loading model tiny-b..." in logs
    assert logs[-1].startswith("✓ Model loaded: tiny-b") and "max context 4096" in logs[-1]
    assert messages[-1] == {**messages[-1], "type": "model_switched", "model": "tiny-b"}
    assert "Model switched to tiny-b" in (await watcher.until("log"))[-1]["message"]
    after = await answer(client)
    assert after != before
    assert (await Client.open(models_server.url)).welcome["model"] == "tiny-b"
    await client.send({"type": "switch_model", "model_path": "tiny-a"})  # a bare name works too
    await client.until("model_switched")
    assert await answer(client) == before
    await client.close()
    await watcher.close()


async def test_ready_is_503_while_a_switch_loads_the_next_model(start_server, tiny_model, default_model):
    """GET /ready is 200 while a model serves, 503 while a switch unloads it and loads the next (the 135M
    model: long enough a load to be seen by a client that asks all along), and 200 again after."""
    import httpx
    from conftest import free_port

    def populate(root):
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "models" / "next").symlink_to(default_model, target_is_directory=True)

    server = start_server(tiny_model, populate, server={"http_port": free_port()})
    client = await Client.open(server.url)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        before = await http.get("/ready")
        assert before.status_code == 200 and before.json()["status"] == "ready"
        switch = asyncio.create_task(client.until_done({"type": "switch_model", "model_path": "models/next"},
                                                       "model_switched"))
        seen = []
        while not switch.done():  # a client asking all along, until the switch answers
            answer = await http.get("/ready")
            seen.append((answer.status_code, answer.json()["status"]))
        assert (await switch)[-1]["type"] == "model_switched"
        assert (503, "not ready") in seen, seen[:5]
        after = await http.get("/ready")
        assert after.status_code == 200 and after.json()["status"] == "ready"
        assert after.json()["model"] != before.json()["model"]
    await client.close()


async def test_a_switch_brings_the_new_models_generation_defaults(start_server, tiny_model):
    """A request's default settings are the loaded model's (its generation_config.json): after a switch, the new
    model's, for a session opened before the switch as for one opened after; what only the old model set is
    gone."""
    def populate(root):
        for name, recommended in (("first", {"max_new_tokens": 3, "top_k": 7}), ("second", {"max_new_tokens": 6})):
            folder = shutil.copytree(tiny_model, root / "models" / name)
            settings = json.loads((folder / "generation_config.json").read_text())
            (folder / "generation_config.json").write_text(json.dumps({**settings, "do_sample": False, **recommended}))
    server = start_server(None, populate, model={"path": "models/first"})
    before = await Client.open(server.url)
    plain = {"type": "inference", "prompt": {"user": "hi"}}  # no settings of its own
    assert (await before.until_done(plain))[-1]["total_tokens"] == 3
    switched = await before.until_done({"type": "switch_model", "model_path": "models/second"}, "model_switched")
    assert switched[-1]["type"] == "model_switched", switched[-1]
    after = await Client.open(server.url)
    for client in (before, after):
        messages = await client.until_done(plain)
        start = next(m for m in messages if m["type"] == "start")
        assert start["max_tokens"] == 6 and start["do_sample"] is False and messages[-1]["total_tokens"] == 6
        config = (await client.request({"type": "config", "data": {}}))["config"]
        assert config == {**DEFAULTS["generation_defaults"], "do_sample": False, "max_new_tokens": 6}
        await client.close()


async def test_a_switch_sent_again_with_its_request_id_runs_once(models_server):
    """A client that may have lost its switch_model frame in a cut sends it again, the same: the server
    switches once, and every message of the switch carries the request_id the client follows."""
    client = await Client.open(models_server.url)
    retries = models_server.output().count("again after a cut")
    frame = {"type": "switch_model", "model_path": "var/models/tiny-b", "request_id": "switch-1"}
    await client.send(frame)
    await client.send(frame)
    messages = await client.until("model_switched", "error")
    assert messages[-1]["type"] == "model_switched" and messages[-1]["model"] == "tiny-b"
    assert {m.get("request_id") for m in messages if m["type"] in ("log", "queued", "model_switched")} == {"switch-1"}
    assert models_server.output().count("again after a cut") - retries == 1
    await client.send({"type": "switch_model", "model_path": "tiny-a", "request_id": "switch-2"})
    back = await client.until("model_switched", "error")  # a second tiny-b switch would have answered first
    assert back[-1]["model"] == "tiny-a" and back[0] == {**back[0], "message": "Unloading tiny-b..."}
    await client.close()


async def test_a_failed_load_keeps_the_server_serving_the_old_model(models_server):
    client = await Client.open(models_server.url)
    before = await answer(client)
    await client.send({"type": "switch_model", "model_path": "var/models/broken"})
    messages = await client.until("error")
    assert "Model switch failed" in messages[-1]["message"] and "Still serving tiny-a" in messages[-1]["message"]
    assert any("reloading tiny-a" in m.get("message", "") for m in messages)
    assert await answer(client) == before
    await client.close()


@pytest.mark.parametrize("path, words", [
    ("../../etc", "Model not found"), ("/etc", "Model not found"), ("models/../../outside", "Model not found"),
    ("models/nothing", "Model not found"), ("var/models/escape", "Model not found"), ("", "Model not found"),
    ("var/models/half-done", "cannot be loaded yet"), (".download-x-123", "not a valid model name"),
    ("models/.download-x-123", "not a valid model name"), (42, "Model not found"),
])
async def test_hostile_switches_are_refused(models_server, path, words):
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "switch_model", "model_path": path})
    assert reply["type"] == "error" and words in reply["message"]
    assert (await client.request({"type": "ack"}))["type"] == "ack_received"
    await client.close()


@pytest.mark.parametrize("name, words", [
    ("tiny-a", "must be deleted manually"), ("../outside", "not a valid model name"),
    ("escape", "Model not found"), ("/etc", "not a valid model name"), ("nothing", "Model not found"),
    ("", "not a valid model name"), (".", "not a valid model name"), ("..", "not a valid model name"),
])
async def test_hostile_deletes_are_refused_and_touch_nothing(models_server, name, words):
    before = tree(models_server.root)
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "delete_model", "model_name": name})
    assert reply["type"] == "error" and words in reply["message"]
    assert tree(models_server.root) == before
    await client.close()


async def test_delete_removes_a_var_model_but_never_the_loaded_one(models_server):
    client = await Client.open(models_server.url)
    await client.send({"type": "switch_model", "model_path": "var/models/spare"})
    await client.until("model_switched")
    refused = await client.request({"type": "delete_model", "model_name": "spare"})
    assert refused["type"] == "error" and "loaded" in refused["message"]
    await client.send({"type": "switch_model", "model_path": "models/tiny-a"})
    await client.until("model_switched")
    assert await client.request({"type": "delete_model", "model_name": "spare"}) == {
        "type": "model_deleted", "message": "Model spare deleted"}
    assert not (models_server.root / "var/models/spare").exists()
    assert (models_server.root / "outside/keep.txt").exists()
    await client.close()


async def test_download_from_a_git_lfs_repo_while_chatting(models_server, lfs_repo, tiny_model, git_gates):
    """A chat is answered while the download is held inside git-lfs's pull; the pull's progress is
    reported in MB and percent, from git-lfs's own progress file, while the pull still runs."""
    url = f"file://{lfs_repo}"
    size_mb = (tiny_model / "model.safetensors").stat().st_size / 1024 ** 2
    for gate in ("before-pull", "after-pull"):
        (git_gates / gate).touch()
    async with LLMWSEnhancedClient("127.0.0.1", models_server.port) as client:
        logs = []
        download = asyncio.create_task(client.download_model(url, "downloaded", on_log=logs.append))
        await until_exists(git_gates / "pull-reached")
        text = await asyncio.wait_for(client.inference("chat meanwhile", temperature=0, max_new_tokens=30), 120)
        assert text and not download.done()  # answered while the download waits inside `git lfs pull`
        (git_gates / "before-pull").unlink()
        await until_exists(git_gates / "pull-finished")
        progress = f"LFS objects: {size_mb:.1f}/{size_mb:.1f} MB (100%)"
        for _ in range(600):
            if progress in logs:
                break
            await asyncio.sleep(0.05)
        assert progress in logs and not download.done()  # reported while `git lfs pull` still runs
        (git_gates / "after-pull").unlink()
        done = await download
        assert logs[0] == "Starting download..." and "Using git + git-lfs" in logs
        assert f"Downloading LFS objects ({size_mb:.1f} MB)..." in logs
        assert logs[-1] == "Download complete!"
        entry = done["model"]
        assert entry["name"] == "downloaded" and entry["path"] == "models/downloaded" and entry["complete"]
        target = models_server.root / "models" / "downloaded"
        assert not (target / ".git").exists()
        assert (target / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
        assert not [p for p in (models_server.root / "models").iterdir() if p.name.startswith(".download-downloaded")]
        switch_logs = []
        switched = await client.switch_model("models/downloaded", on_log=switch_logs.append)
        assert switched["model"] == "downloaded" and switch_logs[0].startswith("Unloading")
        deleted = await client.delete_model("tiny-b")
        assert deleted == {"type": "model_deleted", "message": "Model tiny-b deleted"}
        assert not (models_server.root / "var" / "models" / "tiny-b").exists()
        assert "tiny-b" not in [entry["name"] for entry in await client.list_models()]
        with pytest.raises(LLMWSError, match="exists already"):
            await client.download_model(url, "downloaded")
        await client.switch_model("models/tiny-a")


async def logs_until(client, text: str) -> list[dict]:
    """A download's messages up to its log line that starts with `text`."""
    received = []
    while not (received and received[-1]["type"] == "log" and received[-1]["message"].startswith(text)):
        received.append(await client.recv())
        assert received[-1]["type"] != "error", received[-1]
    return received


async def test_at_most_two_downloads_run_at_once(models_server, lfs_repo, git_gates):
    """Two downloads held inside `git lfs pull`: a third is refused, as is the same target twice; both
    finish once the pull may go on."""
    (git_gates / "before-pull").touch()
    first, second, third = [await Client.open(models_server.url) for _ in range(3)]
    try:
        for client, target in ((first, "held-1"), (second, "held-2")):
            reply = await client.request({"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": target})
            assert reply["type"] == "download_started"
            await logs_until(client, "Downloading LFS objects")
        refused = await third.request({"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "held-3"})
        assert refused["type"] == "error" and "2 downloads are running" in refused["message"]
        (git_gates / "before-pull").unlink()
        for client in (first, second):
            assert (await client.until("download_done", "error"))[-1]["type"] == "download_done"
        again = await third.request({"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "held-1"})
        assert again["type"] == "error" and "exists already" in again["message"]
    finally:
        (git_gates / "before-pull").unlink(missing_ok=True)
        for client in (first, second, third):
            await client.close()
    for name in ("held-1", "held-2"):
        shutil.rmtree(models_server.root / "models" / name)


async def test_the_same_target_is_not_downloaded_twice_at_once(models_server, lfs_repo, git_gates):
    """A download into the folder another download is filling is refused while that one runs (the two would
    write one folder); the first goes on and finishes."""
    (git_gates / "before-pull").touch()
    first, second = [await Client.open(models_server.url) for _ in range(2)]
    frame = {"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "wanted-twice"}
    try:
        assert (await first.request(frame))["type"] == "download_started"
        await logs_until(first, "Downloading LFS objects")  # held inside `git lfs pull`
        again = await second.request(frame)
        assert again["type"] == "error" and "models/wanted-twice is being downloaded already" in again["message"]
        (git_gates / "before-pull").unlink()
        assert (await first.until("download_done", "error"))[-1]["type"] == "download_done"
    finally:
        (git_gates / "before-pull").unlink(missing_ok=True)
        for client in (first, second):
            await client.close()
    shutil.rmtree(models_server.root / "models" / "wanted-twice")


@pytest.fixture(scope="module")
def broken_repos(lfs_repo, tiny_model) -> dict:
    """Repositories that fetch but are no model: no weight files, and no config.json."""
    base = lfs_repo.parent
    repos = {}
    for name, spoil in (("no-weights", lambda folder: (folder / "model.safetensors").unlink()),
                        ("no-config", lambda folder: (folder / "config.json").unlink())):
        work = base / f"{name}-work"
        shutil.copytree(tiny_model, work)
        spoil(work)
        repos[name] = lfs_repo_of(work, base / f"{name}.git")
    return repos


@pytest.mark.parametrize("repo, words", [("no-weights", "the download is incomplete: no weight files"),
                                         ("no-config", "has no config.json: not a transformers model")])
async def test_a_download_that_fails_its_check_leaves_nothing(models_server, broken_repos, repo, words):
    before = tree(models_server.root)
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "download_model", "repo": f"file://{broken_repos[repo]}", "target_dir": repo})
    assert reply["type"] == "download_started"
    failure = (await client.until("error"))[-1]
    assert failure["message"].startswith("Download failed: ") and words in failure["message"]
    assert tree(models_server.root) == before
    assert await answer(client)
    await client.close()


async def test_a_download_past_its_time_limit_fails_and_leaves_nothing(start_server, tiny_model, lfs_repo, git_gates):
    server = start_server(tiny_model, environment={"PATH": gated_path(git_gates)},
                          download={"allowed_url_prefixes": [f"file://{lfs_repo.parent}/"], "timeout_s": 2})
    before = tree(server.root)
    (git_gates / "before-pull").touch()  # the pull never starts
    try:
        client = await Client.open(server.url)
        reply = await client.request({"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "slow"})
        assert reply["type"] == "download_started"
        failure = (await client.until("error"))[-1]
        assert failure["message"] == "Download failed: timed out after 2 s"
        assert tree(server.root) == before
        assert await answer(client)
        await client.close()
    finally:
        (git_gates / "before-pull").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def gguf_repo(lfs_repo, default_model) -> Path:
    """A bare git-lfs repository beside lfs_repo, as a GGUF repo on Hugging Face: several quantisations
    (the default model's real Q4_1 file, and a decoy) and a README."""
    gguf = default_model.parent / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work, bare = lfs_repo.parent / "gguf-work", lfs_repo.parent / "smol-gguf.git"
    (work / "q4").mkdir(parents=True)
    shutil.copyfile(gguf, work / "q4" / gguf.name)
    (work / "decoy.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    (work / "README.md").write_text("GGUF files")
    return lfs_repo_of(work, bare, "*.gguf")


async def test_download_of_one_gguf_file_of_a_repo(models_server, gguf_repo, default_model):
    source = default_model.parent / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    async with LLMWSEnhancedClient("127.0.0.1", models_server.port) as client:
        logs = []
        done = await client.download_model(f"file://{gguf_repo}", "smol-q4", on_log=logs.append,
                                           file="q4/SmolLM2-135M-Instruct.Q4_1.gguf")
        total = source.stat().st_size / 1024 ** 2
        assert f"Downloading LFS objects ({total:.1f} MB)..." in logs  # that one object, not the decoy's too
        target = models_server.root / "models" / "smol-q4"
        assert sorted(path.name for path in target.iterdir()) == [source.name]  # no README, no decoy, no .git
        assert (target / source.name).read_bytes() == source.read_bytes()
        entry = done["model"]
        assert entry["path"] == "models/smol-q4" and entry["engine"] == "llama.cpp" and entry["quantization"] == "Q4_1"
        not_gguf = await Client.open(models_server.url)
        reply = await not_gguf.request({"type": "download_model", "repo": f"file://{gguf_repo}", "target_dir": "r",
                                        "file": "README.gguf"})
        assert reply["type"] == "download_started"
        failure = (await not_gguf.until("error"))[-1]
        assert failure["message"] == "Download failed: the repository has no README.gguf"
        await not_gguf.close()
        assert not (models_server.root / "models" / "r").exists()
        if importlib.util.find_spec("llama_cpp"):  # served as it is, by the llama.cpp engine
            await client.switch_model("models/smol-q4")
            watcher = await Client.open(models_server.url)
            assert watcher.welcome["capabilities"]["engine"] == "llama.cpp"
            await watcher.close()
            assert await client.inference("What is the capital of France?", temperature=0, max_new_tokens=12)
            await client.switch_model("models/tiny-a")


@pytest.mark.parametrize("file, words", [
    ("../x.gguf", "file must be"), ("/etc/x.gguf", "file must be"), ("-x.gguf", "file must be"),
    ("model.safetensors", "file must be"), ("a/../../b.gguf", "file must be"), ("x .gguf", "file must be"),
    (["x.gguf"], "file must be"), ("", "file must be"),
])
async def test_hostile_gguf_file_names_are_refused_and_write_nothing(models_server, file, words):
    before = tree(models_server.root)
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "download_model", "repo": "https://huggingface.co/a/b", "target_dir": "x",
                                  "file": file})
    assert reply["type"] == "error" and words in reply["message"]
    assert tree(models_server.root) == before
    await client.close()


@pytest.mark.parametrize("repo, target, words", [
    ("https://example.com/x.git", "x", "must start with"), ("-uhttps://huggingface.co/a/b", "x", "must be a URL"),
    ("ext::sh -c touch% /tmp/pwned", "x", "must be a URL"), ("ext::https://huggingface.co/a", "x", "must start with"),
    ("https://user:pw@huggingface.co/a/b", "x", "credentials"), ("https://huggingface.co/a/b", "../x", "valid model"),
    ("https://huggingface.co/a/b", ".x", "valid model"), ("https://huggingface.co/a/b", "/tmp/x", "valid model"),
    ("https://huggingface.co/a/b", "tiny-a", "exists already"), (None, "x", "must be a URL"),
])
async def test_hostile_downloads_are_refused_and_write_nothing(models_server, repo, target, words):
    before = tree(models_server.root)
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "download_model", "repo": repo, "target_dir": target})
    assert reply["type"] == "error" and words in reply["message"]
    assert tree(models_server.root) == before
    await client.close()


async def test_a_failed_download_leaves_nothing_behind(models_server, lfs_repo):
    before = tree(models_server.root)
    client = await Client.open(models_server.url)
    reply = await client.request({"type": "download_model", "repo": f"file://{lfs_repo.parent}/missing.git",
                                  "target_dir": "missing"})
    assert reply["type"] == "download_started"
    failure = (await client.until("error"))[-1]
    assert "Download failed" in failure["message"] and "git clone failed" in failure["message"]
    assert tree(models_server.root) == before
    await client.close()


async def test_missing_git_lfs_gives_the_seeds_advice(start_server, tiny_model, tmp_path, lfs_repo):
    only_git = tmp_path / "bin"
    only_git.mkdir()
    os.symlink(shutil.which("git"), only_git / "git")
    server = start_server(tiny_model, environment={"PATH": str(only_git)},
                          download={"allowed_url_prefixes": [f"file://{lfs_repo.parent}/"]})
    before = tree(server.root)
    client = await Client.open(server.url)
    reply = await client.request({"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "lfs-less"})
    assert reply["type"] == "download_started"
    failure = (await client.until("error"))[-1]
    assert "Download failed" in failure["message"] and "sudo apt-get install git-lfs" in failure["message"]
    assert tree(server.root) == before
    assert await answer(client)  # the server serves on
    await client.close()


async def test_a_model_folder_deleted_under_the_server(models_server, tiny_model):
    """The loaded model keeps answering from memory; a deleted folder is no longer listed or loadable."""
    root = models_server.root
    shutil.copytree(tiny_model, root / "var" / "models" / "doomed")
    client = await Client.open(models_server.url)
    await client.send({"type": "switch_model", "model_path": "doomed"})
    await client.until("model_switched")
    shutil.rmtree(root / "var" / "models" / "doomed")
    assert await answer(client)  # still served from memory
    listed = await client.request({"type": "list_models"})
    assert "doomed" not in {m["name"] for m in listed["models"]}
    await client.send({"type": "switch_model", "model_path": "models/tiny-a"})
    await client.until("model_switched")
    refused = await client.request({"type": "switch_model", "model_path": "doomed"})
    assert refused["type"] == "error" and "Model not found" in refused["message"]
    await client.close()


def test_the_repl_downloads_switches_and_deletes(models_server, lfs_repo, tiny_model, tmp_path):
    import sys

    import pexpect
    from conftest import REPO
    shutil.copytree(tiny_model, models_server.root / "var" / "models" / "repl-spare")
    repl = pexpect.spawn(sys.executable, [str(REPO / "llm.py"), "--port", str(models_server.port),
                                          "--host", "127.0.0.1", "--plain"],
                         env={**os.environ, "HOME": str(tmp_path)}, encoding="utf-8",
                         timeout=120)
    try:
        repl.expect("you> ")
        repl.sendline(f"/download file://{lfs_repo} repl-dl")
        repl.expect(r"\[download\] done: models/repl-dl")
        repl.sendline("/switch models/repl-dl")
        repl.expect("Model switched to repl-dl")
        repl.sendline("/delete repl-spare")
        repl.expect("Model repl-spare deleted")
        assert not (models_server.root / "var" / "models" / "repl-spare").exists()
        repl.sendline("/switch models/tiny-a")
        repl.expect("Model switched to tiny-a")
        repl.sendline("/quit")
        repl.expect(pexpect.EOF)
    finally:
        repl.close(force=True)


@pytest.fixture(scope="module")
def hub(tiny_model, default_model, tmp_path_factory):
    """A Hugging Face hub on loopback with a transformers repo and a GGUF repo (two quantisations, a README)."""
    from fake_hub import FakeHub

    gguf = default_model.parent / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_repo = tmp_path_factory.mktemp("hub") / "smol-gguf"
    (gguf_repo / "q4").mkdir(parents=True)
    shutil.copyfile(gguf, gguf_repo / "q4" / gguf.name)
    (gguf_repo / "decoy.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    (gguf_repo / "README.md").write_text("GGUF files")
    hub = FakeHub({"org/tiny": tiny_model, "org/smol-gguf": gguf_repo})
    yield hub
    hub.close()


async def test_download_from_the_hugging_face_hub_writes_only_into_models(start_server, tiny_model, hub,
                                                                          default_model, tmp_path):
    """https://huggingface.co/ URLs go through huggingface_hub (snapshot_download, or hf_hub_download for
    one GGUF file), here from a hub on loopback; the hub's cache stays out of the user's home."""
    from fake_hub import COMMIT

    hf_home = tmp_path / "hf-home"
    server = start_server(tiny_model, environment={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home),
                                                   "HF_HUB_DISABLE_TELEMETRY": "1"})
    gguf = default_model.parent / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    async with LLMWSEnhancedClient("127.0.0.1", server.port) as client:
        logs = []
        done = await client.download_model("https://huggingface.co/org/tiny", "from-hub", on_log=logs.append)
        assert "Using huggingface_hub.snapshot_download" in logs and logs[-1] == "Download complete!"
        assert f"GET /org/tiny/resolve/{COMMIT}/model.safetensors" in hub.requests  # fetched from the hub
        target = server.root / "models" / "from-hub"
        assert sorted(path.name for path in target.iterdir()) == sorted(path.name for path in tiny_model.iterdir())
        assert (target / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
        assert done["model"]["path"] == "models/from-hub" and done["model"]["complete"]

        logs.clear()
        done = await client.download_model("https://huggingface.co/org/smol-gguf", "hub-q4", on_log=logs.append,
                                           file=f"q4/{gguf.name}")
        assert "Using huggingface_hub.hf_hub_download" in logs and logs[-1] == "Download complete!"
        target = server.root / "models" / "hub-q4"
        assert [path.name for path in target.iterdir()] == [gguf.name]
        assert (target / gguf.name).read_bytes() == gguf.read_bytes()
        assert not [line for line in hub.requests if "decoy" in line or "README" in line]  # that one file only
        assert done["model"]["engine"] == "llama.cpp"

        with pytest.raises(LLMWSError, match="Download failed"):
            await client.download_model("https://huggingface.co/org/missing", "nothing")
        assert not (server.root / "models" / "nothing").exists()
        assert not [path for path in (server.root / "models").iterdir() if path.name.startswith(".download-")]

        switched = await client.switch_model("models/from-hub")
        assert switched["model"] == "from-hub"
        assert await client.inference("Hello from the hub", temperature=0, max_new_tokens=8)
    assert not hf_home.exists() or not any(hf_home.rglob("*"))  # nothing written outside the project


def custom_code_model(tiny_model: Path, folder: Path, marker: Path) -> Path:
    """The tiny model as a model with its own Python code (auto_map), code that leaves `marker` when it runs."""
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="x-custom", architectures=["XForCausalLM"],
                  auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(f"""import pathlib
from transformers import LlamaConfig
pathlib.Path({str(marker)!r}).write_text("the model's own code ran")


class XConfig(LlamaConfig):
    model_type = "x-custom"
""")
    (folder / "modeling_x.py").write_text("""from transformers import LlamaForCausalLM
from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
""")
    return folder


async def test_a_model_s_own_code_runs_only_with_trust_remote_code(start_server, tiny_model, tmp_path):
    marker = tmp_path / "ran.txt"
    environment = {"HF_HOME": str(tmp_path / "hf-home")}  # transformers copies a model's code there
    server = start_server(tiny_model, lambda root: custom_code_model(tiny_model, root / "models" / "custom", marker),
                          environment=environment)
    async with LLMWSEnhancedClient("127.0.0.1", server.port) as client:
        with pytest.raises(LLMWSError, match="trust_remote_code"):
            await client.switch_model("models/custom")
        assert not marker.exists()  # refused before any of its code ran
        assert await client.inference("still here?", temperature=0, max_new_tokens=5)  # the old model serves

    trusting = start_server(custom_code_model(tiny_model, tmp_path / "custom", marker), environment=environment,
                            model={"trust_remote_code": True})
    assert marker.read_text() == "the model's own code ran"
    async with LLMWSEnhancedClient("127.0.0.1", trusting.port) as client:
        assert await client.inference("Hello", temperature=0, max_new_tokens=5)
