"""engines/transformers/embedding.py: the pooling a sentence-transformers folder names (in-process, on the tiny
random model), and the groups that keep each forward pass within its token budget."""
import json
import math
import shutil

import pytest
import torch

from llmws_server.config import DEFAULTS
from llmws_server.engines.transformers import embedding
from llmws_server.engines.transformers.engine import Engine


def test_a_sentence_transformers_folder_names_its_pooling(tiny_model, tmp_path):
    folder = tmp_path / "tiny-st"
    shutil.copytree(tiny_model, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert embedding.pooling_of(folder) == embedding.Pooling("last", False)
    assert embedding.pooling_of(tiny_model) == embedding.Pooling("mean", True)
    engine = Engine(folder, DEFAULTS["model"], DEFAULTS["optimization"], 512)
    vectors, _ = engine.embed(["one two three", "four"])
    ids = engine.tokenizer("one two three")["input_ids"]
    with torch.inference_mode():
        hidden = engine.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert vectors[0] == pytest.approx(hidden[-1].float().tolist(), abs=1e-4)  # the last token's, not normalised
    assert not math.isclose(math.hypot(*vectors[0]), 1, abs_tol=1e-3)


def test_groups_keep_each_forward_pass_within_its_token_budget():
    ids = [[1] * length for length in (5, 4000, 3, 4000, 4000, 10)]
    found = embedding.groups(ids)
    assert sorted(index for group in found for index in group) == list(range(len(ids)))
    assert all(max(len(ids[i]) for i in group) * len(group) <= embedding.FORWARD_TOKENS for group in found)
    assert found[0] == [2, 0, 5]  # the short ones together
