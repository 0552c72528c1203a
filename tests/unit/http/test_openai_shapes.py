"""http/openai_shapes.py: a chat completion's body read into the server's request."""
import pytest

from llmws_server.config import DEFAULTS
from llmws_server.http import openai_shapes
from llmws_server.http.errors import APIError

DEFAULT_SETTINGS = DEFAULTS["generation_defaults"]


def test_openai_settings_map_onto_the_servers_and_unsupported_ones_are_refused():
    body = {"messages": [{"role": "developer", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0, "stop": "\n", "user": "ignored", "n": 1, "seed": None}
    request = openai_shapes.chat_request(body, DEFAULT_SETTINGS)
    assert request.inference.turns[0] == {"role": "system", "content": "Be brief"}
    assert request.inference.settings.max_new_tokens == 5 and request.stop == ("\n",) and not request.stream
    with pytest.raises(APIError) as refused:
        openai_shapes.chat_request({**body, "tools": [{"type": "function"}]}, DEFAULT_SETTINGS)
    assert refused.value.param == "tools" and refused.value.status == 400
    with pytest.raises(APIError, match="max_tokens must be >= 1"):
        openai_shapes.chat_request({**body, "max_tokens": 0}, DEFAULT_SETTINGS)
