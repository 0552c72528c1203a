"""JSON as a model writes it, read a character at a time: where one value ends (JsonValue), and one tool
call's object {"name": ..., "arguments": ...}, whose arguments stream as they come (CallObject)."""
import json
from typing import Protocol

ARGUMENT_KEYS = ("arguments", "parameters")
VALUE_START = '"{[-0123456789tfn'  # how a JSON value may begin


class Calls(Protocol):
    """What a CallObject tells of the calls it reads (output_parsers' _ToolCalls)."""

    def accepts(self, name: str) -> bool: ...

    def start(self, name: str) -> int:
        """A call of `name` begins: its index."""
        ...

    def arguments(self, index: int, text: str) -> None: ...


def _json_string(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class JsonValue:
    """Finds where one JSON value ends, a character at a time: it follows strings (with their escapes) and
    the nesting of objects and arrays. A number, true, false or null ends only at the character after it."""

    def __init__(self) -> None:
        self.started = self.done = self.scalar = self.in_string = self.escaped = False
        self.depth = 0

    def take(self, c: str) -> bool:
        """True if c is part of the value; False if the value (a scalar) ended just before c."""
        if not self.started:
            self.started, self.in_string, self.scalar = True, c == '"', c not in '"{['
            self.depth = int(c in "{[")
        elif self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                self.done = self.depth == 0
        elif self.scalar:
            if c in ",:;}] \t\r\n":
                self.done = True
                return False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class CallObject:
    """One call's JSON object {"name": ..., "arguments": ...} (keys in any order, others skipped), read a
    character at a time. Once the name is known and the arguments' value begins, the call starts and that
    value's text streams; arguments seen before the name wait for the object's end. Given a name, it reads a
    bare arguments value instead (mistral's name[ARGS]{...}). `raw` keeps all it read, to give back as Text
    should it turn out not to be a call."""

    def __init__(self, calls: Calls, prefix: str, name: str | None = None):
        self.calls = calls
        self.raw = [prefix]
        self.name = name
        self.bare = name is not None
        self.state = "value?" if self.bare else "{"  # what comes next: "{", "key", ":", "value?", ",}"
        self.key = "arguments" if self.bare else ""
        self.value: JsonValue | None = None  # the value (or key) being read
        self.role = ""  # what that value is: "key", "name", "held" or "stream" (arguments), "skip"
        self.text: list[str] = []  # the text of a key, a name or held arguments
        self.streamed: list[str] = []  # arguments read and not yet given out
        self.held_arguments: str | None = None
        self.index: int | None = None  # once the call has started
        self.broken = self.finished = False

    @property
    def started(self) -> bool:
        return self.index is not None

    def take(self, c: str) -> bool:
        """Reads c; False if c was left unread: the call ended before it, or c broke it."""
        if self.value is not None:
            if not self.value.take(c):  # a scalar ended before c
                self._end_value()
                return not (self.broken or self.finished) and self.take(c)
            self._read(c)
            if self.value.done:
                self._end_value()
            return True
        if c.isspace():  # between tokens
            self.raw.append(c)
            return True
        if self.state == "{" and c == "{":
            self.state = "key"
        elif self.state == "key" and c == '"':
            return self._begin("key", c)
        elif self.state == ":" and c == ":":
            self.state = "value?"
        elif self.state == "value?" and c in VALUE_START:
            return self._begin(self._role_of_value(), c)
        elif self.state == ",}" and c == ",":
            self.state = "key"
        elif self.state in ("key", ",}") and c == "}":
            self._close()
        else:
            self.broken = True
            return False
        self.raw.append(c)
        return True

    def _role_of_value(self) -> str:
        if self.key == "name" and self.name is None:
            return "name"
        if self.key in ARGUMENT_KEYS and not self.started and self.held_arguments is None:
            return "held" if self.name is None else "stream"
        return "skip"

    def _begin(self, role: str, c: str) -> bool:
        self.value, self.role, self.text = JsonValue(), role, []
        if role == "stream":
            assert self.name is not None
            self.index = self.calls.start(self.name)
        self.value.take(c)
        self._read(c)
        return True

    def _read(self, c: str) -> None:
        self.raw.append(c)
        if self.role == "stream":
            self.streamed.append(c)
        elif self.role != "skip":
            self.text.append(c)

    def _end_value(self) -> None:
        text, role, self.value = "".join(self.text), self.role, None
        self.state = ",}"
        if role == "key":
            self.key, self.state = _json_string(text) or "", ":"
        elif role == "name":
            self.name = _json_string(text)
            self.broken = not self.name or not self.calls.accepts(self.name)  # then it is text
        elif role == "held":
            self.held_arguments = text
        self.finished = self.bare and role == "stream"

    def give_out_arguments(self) -> None:
        if self.streamed and self.index is not None:
            self.calls.arguments(self.index, "".join(self.streamed))
            self.streamed.clear()

    def _close(self) -> None:
        """The object's "}": a call needs a name and arguments."""
        if not self.started:
            if self.name is None or self.held_arguments is None:
                self.broken = True
                return
            self.index = self.calls.start(self.name)
            self.calls.arguments(self.index, self.held_arguments)
        self.finished = True
