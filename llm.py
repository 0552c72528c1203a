#!/usr/bin/env python3
"""llm.py: the LLMWS command-line client and Python API.

    python llm.py                         interactive chat (/help lists the commands)
    python llm.py --prompt "Hello"        one answer to stdout, for scripts (--prompt - reads stdin)

    from llm import LLMWSEnhancedClient   the async API
"""
import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from llm_repl import Repl
from llm_view import make_view
from llmws_client import Answer, LLMWSEnhancedClient, LLMWSError, image_data_url

__all__ = ["Answer", "LLMWSEnhancedClient", "LLMWSError", "image_data_url", "main"]  # the API: `from llm import ...`

# -- command line --------------------------------------------------------------------------------

EXAMPLES = """examples:
  python llm.py                                    chat in the terminal (/help lists the commands)
  python llm.py --prompt "What is the capital of France?"
  echo "Summarise: ..." | python llm.py            one answer for the text on stdin
  python llm.py --prompt "What is in it?" --image photo.jpg          a question about an image
  python llm.py --host gpu-box --port 8765 --token "$LLMWS_TOKEN" --temperature 0
  python llm.py --session 3f2c...                  take up an earlier session (its answers resume)
  python llm.py --prompt "Invent a person" --json-schema person.json    JSON that matches the schema
      (person.json: {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
  python llm.py --prompt "Weather in Paris?" --tools tools.json --tool-choice get_weather
      (tools.json: [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}];
      each call is printed as a JSON line {"id", "name", "arguments"}, arguments the JSON text)

Unset generation options take the server's values (the model's own recommendations where it has them)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="LLMWS client: chat in the terminal, or one answer with --prompt.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", help="one-shot: print the answer to this prompt and exit; '-' reads stdin "
                                         "(default: chat, or one answer to stdin when it is not a terminal)")
    parser.add_argument("--system", help="system prompt (default: none)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for the (first) question; repeat for several; needs a vision model")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 is greedy (default: the server's)")
    parser.add_argument("--max-tokens", type=int, dest="max_new_tokens", metavar="N",
                        help="most tokens in an answer (default: the server's)")
    parser.add_argument("--top-p", type=float, dest="top_p", metavar="P",
                        help="nucleus sampling: keep the likeliest tokens up to this mass (default: the server's)")
    parser.add_argument("--top-k", type=int, dest="top_k", metavar="K",
                        help="sample among the K likeliest tokens (default: the server's)")
    parser.add_argument("--host", default="localhost", help="server host (default: localhost)")
    parser.add_argument("--port", type=int, default=8765, help="server port (default: 8765)")
    parser.add_argument("--session", metavar="ID", help="take up an earlier session by its id (default: a new one)")
    parser.add_argument("--token", default=os.environ.get("LLMWS_TOKEN"),
                        help="auth token (default: $LLMWS_TOKEN, else none)")
    parser.add_argument("--tls", action="store_true", help="connect with wss:// (default: ws://)")
    parser.add_argument("--plain", action="store_true",
                        help="print the answer's text as it streams, without rendering Markdown "
                             "(default: rendered on a terminal, plain into a pipe or file)")
    parser.add_argument("--json", action="store_true", help="one-shot: print the raw protocol messages, one per line")
    parser.add_argument("--json-schema", metavar="FILE", dest="json_schema",
                        help="one-shot: the answer is JSON that matches the JSON schema in FILE (default: free text)")
    parser.add_argument("--tools", metavar="FILE",
                        help="one-shot: the tools the model may call, a JSON list of OpenAI function tools in FILE "
                             "(default: none)")
    parser.add_argument("--tool-choice", dest="tool_choice", metavar="CHOICE",
                        help="with --tools: auto, none, required, or a tool's name that must be called "
                             "(default: auto)")
    return parser.parse_args(argv)


def generation_config(args) -> dict:
    names = ("temperature", "max_new_tokens", "top_p", "top_k")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


class UsageError(Exception):
    """A command-line option that cannot be used (a file unreadable or not JSON): one line, exit 1."""


def read_json_file(path: str, option: str):
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{option} {path}: not JSON ({exc})") from None


def request_options(args) -> dict:
    """The frame fields the command line asks for: response_format from --json-schema, tools and
    tool_choice from --tools and --tool-choice."""
    options: dict = {}
    if args.json_schema:
        schema = read_json_file(args.json_schema, "--json-schema")
        if not isinstance(schema, dict):
            raise UsageError(f"--json-schema {args.json_schema}: not a JSON schema (an object)")
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in os.path.basename(args.json_schema))
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": name[:64], "schema": schema}}
    if args.tools:
        tools = read_json_file(args.tools, "--tools")
        if isinstance(tools, dict):
            tools = [tools]
        if not isinstance(tools, list):
            raise UsageError(f"--tools {args.tools}: not a list of tools")
        # {"name", "parameters"} alone is taken as the function of a function tool
        options["tools"] = [tool if not isinstance(tool, dict) or "type" in tool else {"type": "function",
                                                                                       "function": tool}
                            for tool in tools]
    if args.tool_choice:
        if not args.tools:
            raise UsageError("--tool-choice needs --tools")
        choice = args.tool_choice
        options["tool_choice"] = choice if choice in ("auto", "none", "required") else {
            "type": "function", "function": {"name": choice}}
    return options


def describe_failure(exc: BaseException, args) -> str:
    if isinstance(exc, InvalidStatus):
        return f"server refused the connection: HTTP {exc.response.status_code} {exc.response.body.decode().strip()}"
    if isinstance(exc, ConnectionClosed) and exc.rcvd:
        return f"server closed the connection: {exc.rcvd.code} {exc.rcvd.reason}"
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return (f"cannot reach the server at {args.host}:{args.port} ({exc or 'timed out'}): "
                "is `python llmws.py` running?")
    return str(exc)


async def one_shot(args, prompt: str) -> int:
    options = request_options(args)  # before connecting: a bad file is the user's to fix first
    if args.json:
        print_json = lambda message: print(json.dumps(message, ensure_ascii=False), flush=True)  # noqa: E731
        client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                     on_status=lambda text: print(f"[{text}]", file=sys.stderr), on_message=print_json)
        await client.connect()
        print_json(client.welcome)
        try:
            await client.inference(prompt, system=args.system, images=args.image, **options,
                                   **generation_config(args))
        finally:
            await client.disconnect(send_ack=False)
        return 0
    views = []  # the answer's view, once connected: it shows queue positions too
    client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                 on_status=lambda text: views[0].status(text) if views else None)
    await client.connect()
    views.append(make_view(args.plain))
    try:
        answer = await client.inference(prompt, system=args.system, on_token=views[0].add, images=args.image,
                                        **options, **generation_config(args))
    finally:
        views[0].finish()
        await client.disconnect(send_ack=False)
    for call in answer.tool_calls:  # after the text, one JSON line each
        print(json.dumps(call, ensure_ascii=False), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    prompt = args.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    try:
        if prompt is None:
            if args.json_schema or args.tools:
                raise UsageError("--json-schema and --tools go with one-shot mode (--prompt)")
            return Repl(args, generation_config(args)).run()
        return asyncio.run(one_shot(args, prompt))
    except (LLMWSError, UsageError) as exc:
        print(f"llm: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (llm.py ... | head): not an error of ours
        sys.stderr.close()
        return 0
    except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError) as exc:
        print(f"llm: {describe_failure(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
