"""core/requests.py: JSON read with a bound on its nesting."""
import pytest

from llmws_server.core.requests import MAX_DEPTH, parse_json
from llmws_server.errors import Refused


def test_json_nested_16_levels_is_read_and_17_is_refused():
    def nested(levels):
        return '{"type": "ack", "x":' + '{"a":' * (levels - 1) + "1" + "}" * levels

    assert parse_json(nested(MAX_DEPTH))["type"] == "ack"
    with pytest.raises(Refused, match="nested too deeply"):
        parse_json(nested(MAX_DEPTH + 1))
