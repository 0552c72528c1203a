"""Tool calls and structured output as the core takes them, whichever front end they came through: the
tools (OpenAI's function shape, which the WebSocket protocol shares), the choice among them, the
response format, the rendering of a conversation with tools for a model whose chat template has none,
and the output parser each request needs."""
import json
import re
from dataclasses import dataclass

from llmws_server.core.constraints import ANY_JSON_OBJECT, checked_schema, tool_call_schema
from llmws_server.core.output_parsers import OutputParser
from llmws_server.core.tool_templates import choose_style, generic_tool_prompt, generic_tool_turns
from llmws_server.errors import Refused

NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's function names, and MCP's dotted ones
MAX_TOOLS = 128
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolUse:
    tools: tuple[dict, ...]  # {"type": "function", "function": {"name", "description"?, "parameters"?}}
    choice: str  # "auto", "none", "required", or "named"
    name: str | None = None  # the named tool
    parallel: bool = True  # more than one call in an answer

    @property
    def constrained(self) -> bool:
        """The answer must be a call: decoded under the tools' grammar, whatever the model."""
        return self.choice in ("required", "named")

    def schema(self) -> dict:
        return tool_call_schema(list(self.tools), self.name)


def checked_tools(value: object, choice: object, parallel: object = True) -> ToolUse | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; None when there are no tools."""
    if value is None or value == []:
        if choice not in (None, "none", "auto"):
            raise Refused("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise Refused(f"tools must be a list of at most {MAX_TOOLS} function tools", "tools")
    tools = tuple(_tool(tool, f"tools[{index}]") for index, tool in enumerate(value))
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise Refused("tools: two tools have the same name", "tools")
    if not isinstance(parallel, bool):
        raise Refused("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if choice is None or choice in CHOICES:
        return ToolUse(tools, choice or "auto", None, parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or (isinstance(choice, dict) and choice.get("type") != "function"):
        raise Refused('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                      '{"name": ...}}', "tool_choice")
    if name not in names:
        raise Refused(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolUse(tools, "named", name, parallel)


def _tool(tool: object, where: str) -> dict:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not NAME.match(function["name"]):
        raise Refused(f'{where} must be {{"type": "function", "function": {{"name": "<letters, digits, _ . : ->", '
                      f'"parameters": {{...}}}}}}', "tools")
    if not isinstance(function.get("description", ""), str):
        raise Refused(f"{where}.function.description must be a string", "tools")
    parameters = function.get("parameters")
    if parameters is not None:
        checked_schema(parameters, f"{where}.function.parameters")
    kept = {key: function[key] for key in ("name", "description", "parameters") if key in function}
    return {"type": "function", "function": kept}


def response_schema(value: object, field: str = "response_format") -> dict | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"?}}: the schema the answer must match, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused(f"{field} must be an object", field)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
        inner = value["json_schema"]
        return checked_schema(inner.get("schema", ANY_JSON_OBJECT), f"{field}.json_schema.schema")
    raise Refused(f'{field} must be {{"type": "text"}}, {{"type": "json_object"}} or {{"type": "json_schema", '
                  f'"json_schema": {{"name": ..., "schema": {{...}}}}}}', field)


def rendered(turns: list[dict], use: ToolUse | None, template: str | None) -> tuple[list[dict], list[dict] | None]:
    """The turns and tools to give the chat template. A template that takes tools gets them as they are
    (a call's arguments as an object, as templates expect); for one that does not, the tools go into the
    system turn in the generic form and calls and results into plain text (output_parsers)."""
    tools = list(use.tools) if use is not None and use.choice != "none" else None
    has_tool_turns = any(turn.get("tool_calls") or turn["role"] == "tool" for turn in turns)
    if "tools" in (template or "") or not (tools or has_tool_turns):
        return [_with_argument_objects(turn) for turn in turns], tools
    turns = generic_tool_turns(turns)
    if tools:
        prompt = generic_tool_prompt(tools)
        if turns and turns[0]["role"] == "system":
            turns = [{**turns[0], "content": f"{turns[0]['content']}\n\n{prompt}"}, *turns[1:]]
        else:
            turns = [{"role": "system", "content": prompt}, *turns]
    return turns, None


def _with_argument_objects(turn: dict) -> dict:
    if not turn.get("tool_calls"):
        return turn
    calls = []
    for call in turn["tool_calls"]:
        arguments = call["function"]["arguments"]
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**turn, "tool_calls": calls}


def parser_for(use: ToolUse | None, reasoning: bool, template: str | None, configured: str) -> OutputParser | None:
    """What reads this request's answer: the model's own tool-call format (or the grammar's JSON for a
    required call), and its thinking; None when plain text is all there can be."""
    if use is not None and use.constrained:
        style: str | None = "json"
    elif use is not None and use.choice == "auto":
        style = choose_style(template, configured)
    else:
        style = None
    if style is None and not (reasoning and template and "<think>" in template):
        return None
    names = frozenset(tool["function"]["name"] for tool in use.tools) if use is not None else frozenset()
    return OutputParser(style, reasoning, names)
