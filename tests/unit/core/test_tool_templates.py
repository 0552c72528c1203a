"""core/tool_templates.py without a model: the call format a chat template means, and the generic tool prompt
and turns for a template that renders no tools."""
import json

import pytest

from llmws_server.core.output_parsers import STYLES
from llmws_server.core.tool_templates import choose_style, generic_tool_prompt, generic_tool_turns

from .parsing import Args, Started, parse


@pytest.mark.parametrize("template, style", [
    ("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|>", "llama3"),
    ("{{ '<|python_tag|>' + call }}", "llama3"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),
    (None, "hermes"),
])
def test_choose_style_reads_the_template(template, style):
    assert choose_style(template) == style


def test_choose_style_honours_the_configured_style():
    for style in STYLES:
        assert choose_style("<tool_call>", style) == style
    with pytest.raises(ValueError):
        choose_style("<tool_call>", "xml")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def test_generic_tool_prompt_lists_each_tool_as_json_and_shows_the_call_form():
    prompt = generic_tool_prompt(TOOLS)
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in listed.split("\n")] == TOOLS
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    assert "call" in prompt.split("<tools>")[0]


def test_generic_tool_turns_write_calls_and_responses_as_text():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?", "images": ["img"]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": "12:01"},
        {"role": "assistant", "content": "18 C at noon."},
    ]
    assert generic_tool_turns(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?", "images": ["img"]},
        {"role": "assistant", "content": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                         '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
                                         '"arguments": {}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n12:00\n"
                                    "</tool_response>"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n12:01\n</tool_response>"},
        {"role": "assistant", "content": "18 C at noon."},
    ]
    assert messages[3]["tool_call_id"] == "call_1"  # the input is left as it was


def test_generic_tool_turns_parse_back_to_the_same_calls():
    turn = generic_tool_turns([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}])[0]
    assert parse(turn["content"], "hermes") == [Started(0, "get_weather"), Args(0, '{"city": "Paris"}')]
