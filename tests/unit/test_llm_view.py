"""llm_view.py, llm.py's terminal view: what part of a streamed answer's Markdown is settled, and how it shows."""
import pytest


@pytest.mark.parametrize("text, end", [
    ("", 0), ("A sentence being writ", 0), ("One.\n", 0), ("One.\n\nTwo", 6),
    ("```python\nx = 1\n\ny = 2\n", 0),                     # a blank line inside code settles nothing
    ("Intro\n\n```python\nx = 1\n```\nAfter", 27),         # a closed code block is settled
    ("A\n\nB\n\n```\nopen", 6),
])
def test_settled_markdown_ends_after_a_blank_line_or_a_closed_code_block(text, end):
    from llm_view import settled
    assert settled(text) == end


def test_the_markdown_view_renders_and_shows_nothing_after_stop():
    import io
    import re

    from rich.console import Console

    from llm_view import MarkdownView

    out = io.StringIO()
    view = MarkdownView(Console(file=out, force_terminal=True, width=60, color_system="standard"))
    view.status("queued: 2 ahead")
    text = "Some **bold** text.\n\n```python\nprint(1)\n```\nAfter that\n- a\n- b"
    for start in range(0, len(text), 3):
        view.add(text[start:start + 3])
    view.stop()
    view.add("LEAKED")
    view.finish("[9 tokens, 1.0 tokens/s]")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "queued: 2 ahead" in shown and "Some bold text." in shown and "print(1)" in shown and "• b" in shown
    assert "**" not in shown and "```" not in shown and "LEAKED" not in shown
    assert shown.rstrip().endswith("[9 tokens, 1.0 tokens/s]")
