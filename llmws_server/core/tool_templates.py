"""Tools as a chat template sees them: which format a model writes its calls in (from its template), and,
for a template with no tool support, the generic rendering: the tools in the system turn and calls and
results as hermes-form text (what core/output_parsers.py reads back)."""
import json

from llmws_server.core.output_parsers import CALL_CLOSE, CALL_OPEN, MISTRAL_CALLS, PYTHON_TAG, STYLES


def choose_style(chat_template: str | None, configured: str = "auto") -> str:
    """The tool style: the configured one, or under "auto" the one the chat template writes (hermes, the
    generic rendering, where the template has no tool support)."""
    if configured != "auto":
        if configured not in STYLES:
            raise ValueError(f"tool style {configured!r} is not one of auto, {', '.join(STYLES)}")
        return configured
    template = chat_template or ""
    if CALL_OPEN in template:
        return "hermes"
    if MISTRAL_CALLS in template:
        return "mistral"
    if PYTHON_TAG in template or "ipython" in template:
        return "llama3"
    return "hermes"


def generic_tool_prompt(tools: list[dict]) -> str:
    """The system prompt's text that offers `tools` ({"type": "function", "function": {...}} each) to a model
    whose chat template has no tool support."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("You may call one or more functions to help answer the user.\n\n"
            f"The functions you can call are listed as JSON inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
            "For each function call, answer with a JSON object holding the function's name and arguments inside "
            f'{CALL_OPEN}{CALL_CLOSE} tags:\n{CALL_OPEN}\n{{"name": <function-name>, "arguments": '
            f"<args-json-object>}}\n{CALL_CLOSE}")


def generic_tool_turns(messages: list[dict]) -> list[dict]:
    """A conversation with its tool calls and tool results as plain text in the hermes form: an assistant
    turn's "tool_calls" become <tool_call> blocks after its content, and each run of "tool" turns one user
    turn of <tool_response> blocks."""
    turns: list[dict] = []
    responses: list[str] = []

    def end_responses() -> None:
        if responses:
            turns.append({"role": "user", "content": "\n".join(responses)})
            responses.clear()

    for message in messages:
        content = _text_of(message.get("content"))
        if message["role"] == "tool":
            responses.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        end_responses()
        if message["role"] == "assistant" and message.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_call_text(call) for call in message["tool_calls"]])
        turn = {"role": message["role"], "content": content}
        if "images" in message:
            turn["images"] = message["images"]
        turns.append(turn)
    end_responses()
    return turns


def _call_text(call: dict) -> str:
    """An OpenAI tool call ({"function": {"name", "arguments": JSON text}}) as a <tool_call> block."""
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON: it goes as a string
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _text_of(content: object) -> str:
    """A turn's content as text: a string, None, or OpenAI-style parts whose texts join."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""
