"""Issue #41's rough edges on a real server: a model folder that is an operator's symlink (served, listed,
switched back to), server.http_port 0 in config.json (no HTTP API, as --http-port 0), and relative paths read
from the config file's folder (the missing-path error says so). The catalog's and the config's own rules for
them are in tests/unit/catalog/test_folders.py and tests/unit/test_config.py."""
import json
import shutil
import subprocess
import sys

import psutil
import pytest
from conftest import REPO, Client, free_port

# -- symlinked model folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linked_server(start_server, tiny_model, tmp_path_factory):
    """A server whose only model in models/ is a symlink to a folder outside the project (served at start-up
    by auto-selection), with a real folder in var/models/ to switch to."""
    outside = tmp_path_factory.mktemp("elsewhere") / "hub-snapshot"
    shutil.copytree(tiny_model, outside)

    def populate(root):
        (root / "models").mkdir()
        (root / "models" / "linked").symlink_to(outside, target_is_directory=True)
        shutil.copytree(tiny_model, root / "var" / "models" / "other")
    return start_server(None, populate)


async def switch(client, path) -> dict:
    await client.send({"type": "switch_model", "model_path": path})
    return (await client.until("model_switched", "error"))[-1]


async def test_a_linked_model_served_at_start_up_can_be_switched_away_from_and_back_to(linked_server):
    client = await Client.open(linked_server.url)
    assert client.welcome["model"] == "linked"  # the link's name, not the name of the folder it points at
    models = {m["name"]: m for m in (await client.request({"type": "list_models"}))["models"]}
    assert models["linked"] == {**models["linked"], "path": "models/linked", "loaded": True, "complete": True}
    assert (await switch(client, "var/models/other"))["model"] == "other"
    back = await switch(client, "linked")
    assert back == {**back, "type": "model_switched", "model": "linked"}
    again = await switch(client, "models/linked")  # the catalogue's path of it, too
    assert again["type"] == "model_switched", again
    models = {m["name"]: m for m in (await client.request({"type": "list_models"}))["models"]}
    assert models["linked"]["loaded"] is True and models["other"]["loaded"] is False
    await client.close()


@pytest.mark.parametrize("path", ["../x", "models/linked/..", "models/../models/linked", "linked/config.json"])
async def test_switches_by_names_with_more_to_them_are_refused_on_the_server(linked_server, path):
    client = await Client.open(linked_server.url)
    reply = await client.request({"type": "switch_model", "model_path": path})
    assert reply["type"] == "error" and ("Model not found" in reply["message"]
                                         or "not a valid model name" in reply["message"]), reply
    await client.close()


# -- server.http_port 0 -----------------------------------------------------------------------------------

def test_a_config_with_http_port_70000_stops_the_start(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"server": {"http_port": 70000}}))
    result = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(file)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "server.http_port': must be 1 to 65535" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


async def test_http_port_0_in_config_json_starts_with_no_http_api(start_server, tiny_model):
    server = start_server(tiny_model, server={"http_port": 0})
    assert json.loads((server.root / "config.json").read_text())["server"]["http_port"] == 0
    client = await Client.open(server.url)  # the WebSocket serves
    await client.close()
    assert "OpenAI-compatible API" not in server.output()
    listening = {conn.laddr.port for conn in psutil.Process(server.process.pid).net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN}
    assert listening == {server.port}  # the WebSocket's port and no other


# -- relative paths ---------------------------------------------------------------------------------------

def test_a_missing_relative_model_path_names_the_config_folder(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "config.json").write_text(json.dumps({"model": {"path": "models/mine"}}))
    refused = subprocess.run([sys.executable, str(REPO / "llmws.py"), "--config", str(project / "config.json"),
                              "--port", str(free_port()), "--http-port", "0"],
                             capture_output=True, text=True, timeout=60, cwd=elsewhere)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"Model not found: {project / 'models' / 'mine'} has no config.json")
    assert f"relative paths are read from {project}, the config file's folder" in refused.stderr
