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

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from llm_repl import Repl
from llm_view import make_view
from llmws_client import LLMWSEnhancedClient, LLMWSError, image_data_url

__all__ = ["LLMWSEnhancedClient", "LLMWSError", "image_data_url", "main"]  # the API: `from llm import ...`

# -- command line --------------------------------------------------------------------------------

EXAMPLES = """examples:
  python llm.py                                    chat in the terminal (/help lists the commands)
  python llm.py --prompt "What is the capital of France?"
  echo "Summarise: ..." | python llm.py            one answer for the text on stdin
  python llm.py --prompt "What is in it?" --image photo.jpg          a question about an image
  python llm.py --host gpu-box --port 8765 --token "$LLMWS_TOKEN" --temperature 0
  python llm.py --session 3f2c...                  take up an earlier session (its answers resume)

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
    return parser.parse_args(argv)


def generation_config(args) -> dict:
    names = ("temperature", "max_new_tokens", "top_p", "top_k")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


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
    if args.json:
        print_json = lambda message: print(json.dumps(message, ensure_ascii=False), flush=True)  # noqa: E731
        client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                     on_status=lambda text: print(f"[{text}]", file=sys.stderr), on_message=print_json)
        await client.connect()
        print_json(client.welcome)
        try:
            await client.inference(prompt, system=args.system, images=args.image, **generation_config(args))
        finally:
            await client.disconnect(send_ack=False)
        return 0
    views = []  # the answer's view, once connected: it shows queue positions too
    client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                 on_status=lambda text: views[0].status(text) if views else None)
    await client.connect()
    views.append(make_view(args.plain))
    try:
        await client.inference(prompt, system=args.system, on_token=views[0].add, images=args.image,
                               **generation_config(args))
        return 0
    finally:
        views[0].finish()
        await client.disconnect(send_ack=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    prompt = args.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    try:
        if prompt is None:
            return Repl(args, generation_config(args)).run()
        return asyncio.run(one_shot(args, prompt))
    except LLMWSError as exc:
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
