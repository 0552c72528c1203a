"""http/runs.py: the OpenAI API's stop strings, however the text streams."""
from hypothesis import given, settings
from hypothesis import strategies as st

from llmws_server.http import runs


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_strings_cut_the_text_at_the_first_complete_one_however_it_streams(text, cuts, stops):
    """Streamed in any pieces, the text sent is the text before the stop string complete first (the longer
    where two end together), or all of it."""
    found = [(index + len(stop), index) for stop in stops if (index := text.find(stop)) >= 0]
    expected = text[:min(found)[1]] if found else text
    watch, sent = runs.StopText(tuple(stops)), []
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    for start, end in zip(bounds, bounds[1:]):
        if not watch.stopped:
            sent.append(watch.feed(text[start:end]))
    if not watch.stopped:
        sent.append(watch.rest())
    assert "".join(sent) == expected and watch.stopped == bool(found)


def test_a_stop_string_complete_first_wins_over_a_longer_one_that_began_earlier():
    """"ba" streams before "b  ": the model stops at "a", the text after it is never generated."""
    for pieces in (["bab  "], ["ba", "b  "], ["b", "a", "b", "  "]):
        watch = runs.StopText(("bab", "a"))
        assert "".join(watch.feed(piece) for piece in pieces if not watch.stopped) == "b" and watch.stopped
