"""What the output parser makes of an answer, for the tests of core/output_parsers.py and core/tool_templates.py:
the events merged, tool call ids checked and replaced by "ID"."""
import re
from dataclasses import replace

from llmws_server.core.events import Text
from llmws_server.core.output_parsers import OutputParser, Reasoning, ToolCallArguments, ToolCallStarted


def Started(index: int, name: str) -> ToolCallStarted:
    return ToolCallStarted(index, "ID", name)


def Args(index: int, text: str) -> ToolCallArguments:
    return ToolCallArguments(index, text)


def merged(events: list) -> list:
    """Adjacent Text, Reasoning and one call's arguments pieces as one; ids checked, then replaced by "ID"."""
    out: list = []
    for event in events:
        if isinstance(event, ToolCallStarted):
            assert re.fullmatch(r"call_[0-9a-f]{24}", event.id), event.id
            event = Started(event.index, event.name)
        last = out[-1] if out else None
        if (type(last) is type(event) and isinstance(event, (Text, Reasoning, ToolCallArguments))
                and getattr(last, "index", None) == getattr(event, "index", None)):
            out[-1] = replace(event, text=last.text + event.text)
        else:
            out.append(event)
    return out


def parse(answer: str | list[str], style: str | None, reasoning: bool = False, tools: frozenset = frozenset()):
    """The merged events of `answer`, fed whole or in the pieces given."""
    parser = OutputParser(style, reasoning, tools)
    events = [event for piece in ([answer] if isinstance(answer, str) else answer) for event in parser.feed(piece)]
    return merged(events + parser.finish())
