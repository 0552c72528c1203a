"""JSON schemas the answer must match (constrained decoding), checked before a request is queued: a
schema the grammar library (llguidance) cannot compile, or one over the size limit, is refused naming the
field, so the worker never meets it."""
import json

import llguidance

from llmws_server.errors import Refused
from llmws_server.grammar import grammar

MAX_SCHEMA_BYTES = 32 * 1024  # a schema's JSON text: enough for any real tool set or response format
ANY_JSON_OBJECT = {"type": "object"}  # response_format json_object


def checked_schema(schema: object, field: str) -> dict:
    """The schema, once llguidance compiles it; Refused names `field` and what is wrong."""
    if not isinstance(schema, dict):
        raise Refused(f"{field} must be a JSON schema (an object)", field)
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise Refused(f"{field} is {len(text)} bytes of JSON: at most {MAX_SCHEMA_BYTES}", field)
    try:
        problem = llguidance.LLMatcher.validate_grammar(grammar(schema))
    except (ValueError, RuntimeError) as exc:
        problem = str(exc)
    if problem:
        raise Refused(f"{field} cannot be used for constrained decoding: {problem}", field)
    return schema


def tool_call_schema(tools: list[dict], name: str | None) -> dict:
    """The answer of a request that must call a tool: {"name", "arguments"} of the named tool, or of any
    of them. Properties in that order, so the name comes first and the arguments can stream."""
    functions = [tool["function"] for tool in tools if name is None or tool["function"]["name"] == name]
    calls = [{"type": "object", "properties": {"name": {"const": function["name"]},
                                               "arguments": function.get("parameters") or ANY_JSON_OBJECT},
              "required": ["name", "arguments"], "additionalProperties": False} for function in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}
