"""A model's streamed answer as typed events: Text, Reasoning (inside <think>...</think>) and tool calls in
the model's own format (STYLES), the arguments streamed as they come. The answer arrives in pieces split
anywhere (one character, half a tag, many tokens); only what could still begin a marker is held back, so an
answer gives the same events, pieces merged, however it is split.

The generic tool prompt and turns for a template without tool support are in tool_templates.py; a call's
JSON object is read by json_values.py. This module knows nothing of sockets, HTTP, engines, tokenizers or
chat templates: text in, events out. It does not check a call's arguments against the tool's schema
either; the caller does.
"""
import re
import uuid
from dataclasses import replace
from typing import Callable, Union

# The events this module gives out are core/events' own (front ends dispatch on those classes).
from llmws_server.core.events import Reasoning, Text, ToolCallArguments, ToolCallStarted
from llmws_server.core.json_values import CallObject

STYLES = ("hermes", "llama3", "mistral", "json")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # hermes
PYTHON_TAG = "<|python_tag|>"  # llama3
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
MISTRAL_HEAD = re.compile(r"\S{0,300}")  # what may stand between [TOOL_CALLS] and [ARGS]: a name, a [CALL_ID]

Event = Union[Text, Reasoning, ToolCallStarted, ToolCallArguments]  # what feed() and finish() give
_PIECES = (Text, Reasoning, ToolCallArguments)


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the beginning of `marker` (and so must wait)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class _Events:
    """The events ready so far: empty pieces left out, adjacent pieces of one kind (and call) merged."""

    def __init__(self) -> None:
        self.ready: list[Event] = []

    def add(self, event: Event) -> None:
        if isinstance(event, _PIECES) and not event.text:
            return
        last = self.ready[-1] if self.ready else None
        if (isinstance(event, _PIECES) and isinstance(last, _PIECES) and type(last) is type(event)
                and getattr(last, "index", None) == getattr(event, "index", None)):
            self.ready[-1] = replace(event, text=last.text + event.text)
        else:
            self.ready.append(event)

    def take(self) -> list[Event]:
        ready, self.ready = self.ready, []
        return ready


class _ToolCalls:
    """The answer's text outside reasoning: text, and calls in one style (None: all of it is text). Each
    mode reads what it can of `buf` and says whether to go on (True) or to wait for more text (False)."""

    def __init__(self, style: str | None, tool_names: frozenset[str], events: _Events):
        self.style, self.tool_names, self.events = style, tool_names, events
        self.buf = ""
        self.count = 0
        self.call: CallObject | None = None
        self.region = ""  # the marker text before the next call object, given back with it if it is no call
        self.after_call = False  # whitespace after a call is dropped if another call or the end follows
        self.marker = {"hermes": CALL_OPEN, "mistral": MISTRAL_CALLS}.get(style or "", "")
        self.mode = {None: "plain", "llama3": "start", "json": "start"}.get(style, "text")
        self.modes: dict[str, Callable[[], bool]] = {
            "plain": self._plain, "text": self._text, "start": self._start, "call": self._call,
            "close": self._close, "between": self._between, "mistral": self._mistral,
            "mistral_name": self._mistral_name, "array": self._array}

    @property
    def in_call(self) -> bool:
        return self.mode not in ("plain", "text", "start")

    def accepts(self, name: str) -> bool:
        return not self.tool_names or name in self.tool_names

    def start(self, name: str) -> int:
        self.count += 1
        self.events.add(ToolCallStarted(self.count - 1, "call_" + uuid.uuid4().hex[:24], name))
        return self.count - 1

    def arguments(self, index: int, text: str) -> None:
        self.events.add(ToolCallArguments(index, text))

    def feed(self, text: str) -> None:
        self.buf += text
        while self.buf and self.modes[self.mode]():
            pass

    def finish(self) -> None:
        if self.call is not None and not self.call.started:
            self.events.add(Text("".join(self.call.raw)))
        held = self.buf.lstrip() if self.after_call else self.buf
        self.events.add(Text(MISTRAL_CALLS + held if self.mode == "mistral_name" else held))
        self.buf, self.call = "", None

    def _plain(self) -> bool:
        self.events.add(Text(self.buf))
        self.buf = ""
        return False

    def _text(self) -> bool:
        """hermes and mistral: text up to the marker that opens calls."""
        if self.after_call:
            body = self.buf.lstrip()
            if body.startswith(self.marker):
                self.buf = body
            elif self.marker.startswith(body):
                return False  # only whitespace, or the beginning of the marker, so far
            self.after_call = False
        at = self.buf.find(self.marker)
        if at < 0:
            ready = len(self.buf) - _held_back(self.buf, self.marker)
            self.events.add(Text(self.buf[:ready]))
            self.buf = self.buf[ready:]
            return False
        self.events.add(Text(self.buf[:at]))
        self.buf = self.buf[at + len(self.marker):]
        if self.style == "hermes":
            self._open_call(CALL_OPEN)
        else:
            self.mode = "mistral"
        return True

    def _start(self) -> bool:
        """llama3 and json: the answer holds calls if, after whitespace (and <|python_tag|>), it begins with "{"."""
        body = self.buf.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        elif PYTHON_TAG.startswith(body):
            return False
        if not body:
            return False
        if body[0] != "{":
            self.mode = "plain"
            return True
        prefix, self.buf = self.buf[:len(self.buf) - len(body)], body
        self._open_call(prefix)
        return True

    def _open_call(self, prefix: str) -> None:
        self.call, self.mode = CallObject(self, prefix), "call"

    def _call(self) -> bool:
        call = self.call
        assert call is not None
        over = False
        for at, c in enumerate(self.buf):
            read = call.take(c)
            if call.broken or call.finished:
                over, self.buf = True, self.buf[at + read:]
                break
        else:
            self.buf = ""
        call.give_out_arguments()
        if over:
            self._call_over(call)
        return over

    def _call_over(self, call: CallObject) -> None:
        """A call ended or broke. One that never started was text; after a started one, the style says
        what may follow."""
        self.call = None
        if not call.started:
            self.events.add(Text("".join(call.raw)))
            self.mode = "text" if self.marker else "plain"
            return
        self.after_call = True
        if self.style == "mistral":
            self.mode = "text" if call.bare else "array"
        else:
            self.mode = "close" if self.style == "hermes" else "between"

    def _close(self) -> bool:
        """hermes, after a call's object: </tool_call>."""
        body = self.buf.lstrip()
        if body.startswith(CALL_CLOSE):
            self.buf = body[len(CALL_CLOSE):]
        elif CALL_CLOSE.startswith(body):
            return False
        self.mode = "text"
        return True

    def _between(self) -> bool:
        """llama3, after a call: ";" and another call, or text. json: only text (one call an answer)."""
        body = self.buf.lstrip()
        if not body:
            return False
        self.buf = body
        if self.style == "llama3" and body[0] == ";":
            self.buf = body[1:]
        elif self.style == "llama3" and body[0] == "{":
            self._open_call("")
        else:
            self.mode = "plain"
        return True

    def _mistral(self) -> bool:
        """After [TOOL_CALLS]: a JSON array of call objects, or (the newer form) name[ARGS]{...}."""
        body = self.buf.lstrip()
        if not body:
            return False
        if body[0] == "[":
            self.buf, self.region, self.mode = body[1:], MISTRAL_CALLS + "[", "array"
        else:
            self.buf, self.mode = body, "mistral_name"
        return True

    def _array(self) -> bool:
        """Mistral's array: call objects separated by ",", up to "]"; anything else is text."""
        body = self.buf.lstrip()
        if not body:
            return False
        self.buf = body
        if body[0] == "{":
            self._open_call(self.region)
            self.region = ""
            return True
        if body[0] in ",]":
            self.buf = body[1:]
        if body[0] != ",":
            self.mode = "text"
        return True

    def _mistral_name(self) -> bool:
        """The newer form's name, up to [ARGS] (a [CALL_ID] and its id between them are dropped)."""
        at = self.buf.find(MISTRAL_ARGS)
        head = self.buf[:at] if at >= 0 else self.buf[:len(self.buf) - _held_back(self.buf, MISTRAL_ARGS)]
        plausible = MISTRAL_HEAD.fullmatch(head) is not None
        if at < 0 and plausible:
            return False
        name = head.split(MISTRAL_CALL_ID)[0]
        if plausible and FUNCTION_NAME.fullmatch(name) and self.accepts(name):
            self.buf = self.buf[at + len(MISTRAL_ARGS):]
            self.call, self.mode = CallObject(self, MISTRAL_CALLS + head + MISTRAL_ARGS, name), "call"
            return True
        self.events.add(Text(MISTRAL_CALLS))  # no call: the marker and what follows are text
        self.mode = "text"
        return True


class OutputParser:
    """One answer's text pieces in, events out: feed() each piece, finish() at the end."""

    def __init__(self, tool_style: str | None, reasoning: bool, tool_names: frozenset[str] = frozenset()):
        if tool_style is not None and tool_style not in STYLES:
            raise ValueError(f"tool style {tool_style!r} is not one of {', '.join(STYLES)}")
        self._events = _Events()
        self._tools = _ToolCalls(tool_style, tool_names, self._events)
        self._reasoning = reasoning
        self._thinking = False
        self._strip = False  # whitespace right after <think> and right after </think> is dropped
        self._buf = ""

    @property
    def calls(self) -> int:
        """How many tool calls have started so far."""
        return self._tools.count

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        while self._buf and self._step():
            pass
        return self._events.take()

    def finish(self) -> list[Event]:
        if self._thinking:  # an answer cut off while reasoning
            self._events.add(Reasoning(self._buf))
        else:
            self._tools.feed(self._buf)
        self._buf = ""
        self._tools.finish()
        return self._events.take()

    def _step(self) -> bool:
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._strip = False
        if self._thinking:
            return self._reason()
        if not self._reasoning:
            self._tools.feed(self._buf)
            self._buf = ""
            return False
        return self._answer()

    def _reason(self) -> bool:
        at = self._buf.find(THINK_CLOSE)
        if at < 0:
            ready = len(self._buf) - _held_back(self._buf, THINK_CLOSE)
            self._events.add(Reasoning(self._buf[:ready]))
            self._buf = self._buf[ready:]
            return False
        self._events.add(Reasoning(self._buf[:at]))
        self._buf = self._buf[at + len(THINK_CLOSE):]
        self._thinking, self._strip = False, True
        return True

    def _answer(self) -> bool:
        at = self._buf.find(THINK_OPEN)
        if at < 0:
            ready = len(self._buf) - _held_back(self._buf, THINK_OPEN)
            self._tools.feed(self._buf[:ready])
            self._buf = self._buf[ready:]
            return False
        self._tools.feed(self._buf[:at])
        self._buf = self._buf[at + len(THINK_OPEN):]
        if self._tools.in_call:  # inside a call the tag is the call's own text
            self._tools.feed(THINK_OPEN)
        else:
            self._thinking = self._strip = True
        return True
