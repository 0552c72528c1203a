"""Issue #41's rough edges: a model folder that is an operator's symlink (served, listed, switched back to),
server.http_port 0 in config.json (no HTTP API, as --http-port 0), and relative paths read from the config
file's folder (the missing-path error says so)."""
import json
import shutil
import subprocess
import sys

import psutil
import pytest
from conftest import REPO, Client, free_port

from llmws_server.catalog import folders as catalog
from llmws_server.config import load_config
from llmws_server.errors import ConfigError, Refused

# -- symlinked model folders ------------------------------------------------------------------------------


@pytest.fixture()
def linked(tmp_path, tiny_model):
    """A project whose models/linked and var/models/vlink are symlinks to model folders outside it, with
    a model folder one level inside a linked folder (outside/nested/deep) that no name may reach."""
    config = load_config(tmp_path / "project" / "config.json")
    config.paths["models_dir"].mkdir(parents=True)
    (config.paths["var_dir"] / "models").mkdir(parents=True)
    outside = tmp_path / "cache"
    shutil.copytree(tiny_model, outside / "snapshot-a")
    shutil.copytree(tiny_model, outside / "nested" / "deep")
    (config.paths["models_dir"] / "linked").symlink_to(outside / "snapshot-a", target_is_directory=True)
    (config.paths["models_dir"] / "to-nested").symlink_to(outside / "nested", target_is_directory=True)
    (config.paths["var_dir"] / "models" / "vlink").symlink_to(outside / "snapshot-a", target_is_directory=True)
    return config


def test_an_operators_symlink_in_models_or_var_models_is_found_by_its_name(linked):
    models_dir, var_models = linked.paths["models_dir"], linked.paths["var_dir"] / "models"
    for given in ("linked", "models/linked", "./models/linked"):
        assert catalog.find_model(linked, given) == ("models", models_dir / "linked")
    for given in ("vlink", "var/models/vlink"):
        assert catalog.find_model(linked, given) == ("var", var_models / "vlink")


@pytest.mark.parametrize("given, words", [
    ("../x", "Model not found"), ("../cache/snapshot-a", "Model not found"),
    ("models/../models/linked", "Model not found"), ("models/linked/..", "Model not found|not a valid model name"),
    ("models/to-nested/deep", "Model not found"), ("to-nested/deep", "Model not found"),
    ("var/models/../../models/linked", "Model not found"), ("cache/snapshot-a", "Model not found"),
    ("models/to-nested", "Model not found"),  # followed, but no model folder there
    ("models/.linked", "not a valid model name"), (str(REPO), "Model not found"),
])
def test_names_that_reach_elsewhere_are_still_refused(linked, given, words):
    with pytest.raises(Refused, match=words):
        catalog.find_model(linked, given)


def test_the_catalogue_lists_linked_folders_and_delete_never_follows_a_link(linked):
    entries = {entry["name"]: entry for entry in catalog.scan(linked)}
    assert entries["linked"] == {**entries["linked"], "path": "models/linked", "source": "models", "complete": True}
    assert entries["vlink"] == {**entries["vlink"], "path": "var/models/vlink", "source": "var", "complete": True}
    assert "to-nested" not in entries and "deep" not in entries
    loaded = linked.paths["models_dir"] / "linked"
    for name, refusal in [("vlink", "not found"), ("linked", "deleted manually")]:
        with pytest.raises(Refused, match=refusal):
            catalog.delete(linked, name, loaded)
    assert (linked.paths["var_dir"] / "models" / "vlink").is_symlink()
    assert (linked.paths["var_dir"] / "models" / "vlink" / "config.json").is_file()


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

def test_http_port_0_or_null_in_the_file_is_no_http_api_and_out_of_range_is_refused(tmp_path):
    file = tmp_path / "config.json"
    for value in (0, None):
        file.write_text(json.dumps({"server": {"http_port": value}}))
        assert load_config(file).server["http_port"] is None
    for value in (70000, -1):
        file.write_text(json.dumps({"server": {"http_port": value}}))
        with pytest.raises(ConfigError, match=r"server.http_port': must be 1 to 65535 \(or 0 or null"):
            load_config(file)


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
