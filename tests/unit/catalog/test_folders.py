"""catalog/folders.py: which folders are models, found by which names, and which may be deleted."""
import pytest

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
