"""catalog/folders.py: which folders are models, found by which names (an operator's symlinks too, issue #41),
and which may be deleted."""
import shutil

import pytest
from conftest import REPO

from llmws_server.catalog import folders as catalog
from llmws_server.config import load_config
from llmws_server.errors import Refused


@pytest.fixture()
def folders(tmp_path):
    config = load_config(tmp_path / "config.json")
    for name in ("mine", "loaded"):
        (config.paths["var_dir"] / "models" / name).mkdir(parents=True)
    (config.paths["models_dir"] / "operators").mkdir(parents=True)
    (config.paths["var_dir"] / "models" / "link").symlink_to(config.paths["models_dir"] / "operators")
    return config


def test_the_catalog_deletes_only_unloaded_folders_of_var_models(folders):
    loaded = folders.paths["var_dir"] / "models" / "loaded"
    for name, refusal in [("operators", "deleted manually"), ("loaded", "is loaded"), ("link", "not found"),
                          ("../models", "not a valid model name"), ("nothing", "not found")]:
        with pytest.raises(Refused, match=refusal):
            catalog.delete(folders, name, loaded)
    assert (folders.paths["models_dir"] / "operators").is_dir() and loaded.is_dir()
    assert catalog.delete(folders, "mine", loaded) == "mine"
    assert not (folders.paths["var_dir"] / "models" / "mine").exists()


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
