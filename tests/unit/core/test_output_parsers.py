"""The output parsers without a model: a streamed answer's text pieces in, Text, Reasoning and tool call
events out, whatever the split."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmws_server.core.events import Text
from llmws_server.core.output_parsers import STYLES, OutputParser, Reasoning

from .parsing import Args, Started, merged, parse

WEATHER = '{"city": "Paris", "unit": "celsius"}'
TRICKY = '{"query": {"text": "a } b \\" c {", "tags": ["x", {"y": "]"}]}, "n": -1.5e3, "ok": true}'


# -- hermes -----------------------------------------------------------------------------------------------

def test_hermes_one_call():
    answer = f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    assert parse(answer, "hermes") == [Started(0, "get_weather"), Args(0, WEATHER)]


def test_hermes_text_then_two_calls():
    answer = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert parse(answer, "hermes") == [Text("Let me check both.\n"), Started(0, "get_weather"),
                                       Args(0, '{"city": "Paris"}'), Started(1, "get_time"), Args(1, '{"zone": "CET"}')]


def test_hermes_nested_arguments_with_braces_and_quotes_inside_strings():
    answer = f'<tool_call>\n{{"name": "search", "arguments": {TRICKY}}}\n</tool_call>'
    assert parse(answer, "hermes") == [Started(0, "search"), Args(0, TRICKY)]


def test_hermes_text_after_a_call_is_text_and_counts_calls():
    parser = OutputParser("hermes", False)
    events = parser.feed('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.')
    assert merged(events + parser.finish()) == [Started(0, "f"), Args(0, "{}"), Text("\n\nDone.")]
    assert parser.calls == 1
    # whitespace after a call is dropped when only another call or the end follows it
    assert parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n \n', "hermes") == [
        Started(0, "f"), Args(0, "{}")]


def test_the_arguments_stream_as_they_come():
    parser = OutputParser("hermes", False)
    assert merged(parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')) == [
        Started(0, "get_weather"), Args(0, '{"city": "Pa')]
    assert parser.feed('ris"}') == [Args(0, 'ris"}')]
    assert parser.feed("}") == []  # the call's object closing, not its arguments
    assert parser.feed("\n</tool_call>") == []
    assert parser.finish() == []


def test_only_what_could_begin_a_marker_waits():
    parser = OutputParser("hermes", False)
    assert parser.feed("Hello <too") == [Text("Hello ")]
    assert parser.feed("th") == [Text("<tooth")]
    assert parser.feed(" <tool_ca") == [Text(" ")]
    assert parser.finish() == [Text("<tool_ca")]


def test_arguments_before_the_name_come_whole_at_the_object_end():
    parser = OutputParser("hermes", False)
    assert parser.feed('<tool_call>{"arguments": {"a": [1, 2]}, ') == []
    assert merged(parser.feed('"name": "f"}</tool_call>')) == [Started(0, "f"), Args(0, '{"a": [1, 2]}')]


def test_arguments_given_as_a_json_string_pass_as_they_are():
    answer = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert parse(answer, "hermes") == [Started(0, "f"), Args(0, '"{\\"a\\": 1}"')]


def test_other_keys_are_skipped():
    answer = ('<tool_call>{"id": "x}", "tags": [1, {"}": "]"}], "name": "f", "parameters": {"a": 1}, '
              '"type": "function"}</tool_call>')
    assert parse(answer, "hermes") == [Started(0, "f"), Args(0, '{"a": 1}')]


def test_an_unknown_tool_name_is_text():
    answer = 'Hi <tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>'
    assert parse(answer, "hermes", tools=frozenset({"get_weather"})) == [Text(answer)]
    known = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert parse(known, "hermes", tools=frozenset({"get_weather"})) == [Started(0, "get_weather"), Args(0, "{}")]


@pytest.mark.parametrize("answer", [
    "<tool_call>not json</tool_call> ok",
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',
    '<tool_call>{"name": "f"}</tool_call>',
    '<tool_call>{"name": "f" "arguments": {}}</tool_call>',
    "<tool_call>",
])
def test_malformed_json_before_the_call_starts_is_text(answer):
    assert parse(answer, "hermes") == [Text(answer)]


def test_a_started_call_that_breaks_just_ends():
    answer = '<tool_call>{"name": "f", "arguments": {"a": 1} oops</tool_call>'
    assert parse(answer, "hermes") == [Started(0, "f"), Args(0, '{"a": 1}'), Text("oops</tool_call>")]
    cut = '<tool_call>{"name": "f", "arguments": {"a": "unfinished'
    assert parse(cut, "hermes") == [Started(0, "f"), Args(0, '{"a": "unfinished')]


# -- llama3, mistral, json --------------------------------------------------------------------------------

def test_llama3_one_call_with_python_tag_and_parameters():
    answer = f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}'
    assert parse(answer, "llama3") == [Started(0, "get_weather"), Args(0, WEATHER)]


def test_llama3_two_calls_separated_by_semicolons():
    answer = f' \n{{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "search", "arguments": {TRICKY}}}'
    assert parse(answer, "llama3") == [Started(0, "get_weather"), Args(0, WEATHER), Started(1, "search"),
                                       Args(1, TRICKY)]


def test_llama3_an_answer_not_beginning_with_an_object_is_text():
    answer = 'The call would be {"name": "f", "parameters": {}}'
    assert parse(answer, "llama3") == [Text(answer)]
    assert parse(["  <|py", "thon"], "llama3") == [Text("  <|python")]


def test_mistral_array_of_calls_after_text():
    answer = (f'Sure. [TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
              f'{{"name": "search", "arguments": {TRICKY}, "id": "abc123xyz"}}]')
    assert parse(answer, "mistral") == [Text("Sure. "), Started(0, "get_weather"), Args(0, WEATHER),
                                        Started(1, "search"), Args(1, TRICKY)]


def test_mistral_newer_form_repeated():
    answer = f'[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]search[CALL_ID]a1b2c3d4e[ARGS]{TRICKY}'
    assert parse(answer, "mistral") == [Started(0, "get_weather"), Args(0, WEATHER), Started(1, "search"),
                                        Args(1, TRICKY)]


def test_mistral_an_unknown_name_is_text():
    answer = '[TOOL_CALLS]rm_rf[ARGS]{"path": "/"}'
    assert parse(answer, "mistral", tools=frozenset({"get_weather"})) == [Text(answer)]
    assert parse("[TOOL_CALLS]no call here", "mistral") == [Text("[TOOL_CALLS]no call here")]


def test_json_style_is_exactly_one_object():
    answer = f'{{ "name" : "search" ,\n "arguments" :  {TRICKY} }}\n'
    assert parse(answer, "json") == [Started(0, "search"), Args(0, TRICKY)]
    assert parse('{"name": "f", "arguments": {}} trailing', "json") == [Started(0, "f"), Args(0, "{}"),
                                                                         Text("trailing")]
    assert parse("no object", "json") == [Text("no object")]


def test_no_style_leaves_calls_as_text():
    answer = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse(answer, None) == [Text(answer)]


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError):
        OutputParser("xml", False)


# -- reasoning --------------------------------------------------------------------------------------------

def test_reasoning_then_text():
    answer = "<think>\nThe user greets me.\n</think>\n\nHello!"
    assert parse(answer, None, reasoning=True) == [Reasoning("The user greets me.\n"), Text("Hello!")]


def test_reasoning_then_a_call():
    answer = f'<think>\nParis weather.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}' \
             '\n</tool_call>'
    assert parse(answer, "hermes", reasoning=True) == [Reasoning("Paris weather.\n"), Started(0, "get_weather"),
                                                       Args(0, WEATHER)]
    llama = '<think>hmm</think> {"name": "f", "parameters": {}}'
    assert parse(llama, "llama3", reasoning=True) == [Reasoning("hmm"), Started(0, "f"), Args(0, "{}")]


def test_without_reasoning_the_tags_are_text():
    answer = "<think>x</think>y"
    assert parse(answer, None, reasoning=False) == [Text(answer)]


def test_a_think_tag_inside_a_call_is_the_calls_text():
    answer = '<tool_call>{"name": "f", "arguments": {"s": "<think>"}}</tool_call>'
    assert parse(answer, "hermes", reasoning=True) == [Started(0, "f"), Args(0, '{"s": "<think>"}')]


def test_reasoning_cut_off_is_reasoning():
    parser = OutputParser(None, True)
    assert parser.feed("<think>still thin") == [Reasoning("still thin")]
    assert parser.feed("king </thi") == [Reasoning("king ")]
    assert parser.finish() == [Reasoning("</thi")]


# -- the same events however the answer is split ----------------------------------------------------------

ANSWERS = [
    ("hermes", True, "<think>\nLet me <see>.\n</think>\n\nChecking <tool it.\n<tool_call>\n"
     f'{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n<tool_call>\n'
     f'{{"arguments": {TRICKY}, "name": "search"}}\n</tool_call>\n<tool_call>\nbroken</tool_call> end'),
    ("hermes", False, '<tool_call>{"name": "rm", "arguments": {}}</tool_call><tool_call>{"name": "f", '
     f'"arguments": {TRICKY}}} x</tool_call>'),
    ("llama3", False, f'<|python_tag|> {{"name": "f", "parameters": {TRICKY}}} ; {{"name": "g", "parameters": 7 }};'),
    ("mistral", False, f'Hm [TOOL_CALLS] [{{"name": "f", "arguments": {TRICKY}}}, {{"name": "g", "arguments": {{}}}}]'
     f' then [TOOL_CALLS]h[ARGS]{WEATHER}[TOOL_CALLS]bad name[ARGS]{{}}'),
    ("json", True, f'<think>x</think>{{"name": "search", "arguments": {TRICKY}}}'),
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ANSWERS), st.lists(st.integers(0, 400), max_size=40))
def test_any_split_gives_the_same_events(case, cuts):
    style, reasoning, answer = case
    points = sorted({0, len(answer), *(cut % (len(answer) + 1) for cut in cuts)})
    pieces = [answer[a:b] for a, b in zip(points, points[1:])]
    tools = frozenset({"f", "g", "h", "get_weather", "search"})
    assert parse(pieces, style, reasoning, tools) == parse(answer, style, reasoning, tools)


FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]",
             "<|python_tag|>", '{"name": "f", "arguments": ', '{"arguments": ', '"name": "g"', "{", "}", "[", "]", '"',
             "\\", ",", ";", ":", " ", "\n", "f", "x y", "1", "true", "<", "[T", '"parameters": ', '"}"']


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([None, *STYLES]), st.booleans(), st.lists(st.sampled_from(FRAGMENTS), max_size=25),
       st.lists(st.integers(0, 500), max_size=12))
def test_any_answer_however_broken_parses_the_same_in_any_split(style, reasoning, fragments, cuts):
    answer = "".join(fragments)
    points = sorted({0, len(answer), *(cut % (len(answer) + 1) for cut in cuts)})
    pieces = [answer[a:b] for a, b in zip(points, points[1:])]
    whole = parse(answer, style, reasoning, frozenset({"f"}))
    assert parse(pieces, style, reasoning, frozenset({"f"})) == whole
    if style is None and not reasoning:
        assert whole == ([Text(answer)] if answer else [])


def test_one_character_at_a_time_gives_the_expected_events():
    style, reasoning, answer = ANSWERS[0]
    assert parse(list(answer), style, reasoning) == [
        Reasoning("Let me <see>.\n"), Text("Checking <tool it.\n"), Started(0, "get_weather"), Args(0, WEATHER),
        Started(1, "search"), Args(1, TRICKY), Text("<tool_call>\nbroken</tool_call> end")]
    style, reasoning, answer = ANSWERS[1]
    assert parse(list(answer), style, reasoning, frozenset({"f"})) == [
        Text('<tool_call>{"name": "rm", "arguments": {}}</tool_call>'), Started(0, "f"), Args(0, TRICKY),
        Text(" x</tool_call>")]
    style, reasoning, answer = ANSWERS[2]
    assert parse(list(answer), style, reasoning) == [Started(0, "f"), Args(0, TRICKY), Started(1, "g"), Args(1, "7")]
    style, reasoning, answer = ANSWERS[3]
    assert parse(list(answer), style, reasoning) == [
        Text("Hm "), Started(0, "f"), Args(0, TRICKY), Started(1, "g"), Args(1, "{}"), Text(" then "),
        Started(2, "h"), Args(2, WEATHER), Text("[TOOL_CALLS]bad name[ARGS]{}")]
    style, reasoning, answer = ANSWERS[4]
    assert parse(list(answer), style, reasoning) == [Reasoning("x"), Started(0, "search"), Args(0, TRICKY)]
