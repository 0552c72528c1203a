#!/usr/bin/env python3
"""llm.py: the LLMWS command-line client and Python API.

    python llm.py                         interactive chat (/help lists the commands)
    python llm.py --prompt "Hello"        one answer to stdout, for scripts (--prompt - reads stdin)

    from llm import LLMWSEnhancedClient   the async API
"""
import argparse
import asyncio
import base64
import json
import os
import random
import ssl
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

RETRY_CLOSE_CODES = {1001, 1006, 1011, 1012, 1013}  # going away, lost, server error/restart, try later


class LLMWSError(Exception):
    """An `error` from the server; its other fields (max_context, input_length, …) are in `fields`."""

    def __init__(self, message: dict):
        super().__init__(message.get("message", "error"))
        self.fields = {key: value for key, value in message.items() if key not in ("type", "message")}
        self.max_context = message.get("max_context")
        self.input_length = message.get("input_length")


class LLMWSEnhancedClient:
    """Async client for one session. It reconnects by itself after a drop and takes up its session
    with `last_seq`, so a stream continues with no gap and no duplicate."""

    def __init__(self, host="localhost", port=8765, session_id=None, token=None, tls=False, retries=6,
                 on_status=None, on_message=None):
        self.url = f"{'wss' if tls else 'ws'}://{host}:{port}/" + (f"?token={quote(token)}" if token else "")
        self.tls = tls
        self.session_id = session_id
        self.retries = retries
        self.on_status = on_status or (lambda text: None)  # reconnect notices, queue positions
        self.on_message = on_message  # sees every message from the server (llm.py --json)
        self.last_done = None  # the `done` of the latest answer: total_tokens, tokens_per_s
        self.welcome = None
        self.last_seq = 0
        self._websocket = None
        self._reader = None
        self._replies = asyncio.Queue()  # direct answers, in the order the frames were sent
        self._streams = {}  # request_id -> Queue of its stream messages
        self._listeners = set()  # a Queue per running switch or download: numbered messages without request id
        self._ask_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._closing = False

    # -- connection ------------------------------------------------------------------------------

    async def connect(self) -> dict:
        self._closing = False
        await self._open()
        self._reader = asyncio.create_task(self._read_forever())
        return self.welcome

    async def _open(self) -> None:
        context = ssl.create_default_context() if self.tls else None
        self._websocket = await connect(self.url, ssl=context, max_size=None, open_timeout=10)
        hello = {"session_id": self.session_id, "last_seq": self.last_seq} if self.session_id else {}
        await self._websocket.send(json.dumps(hello))
        welcome = json.loads(await asyncio.wait_for(self._websocket.recv(), 30))
        if welcome.get("type") != "welcome":
            raise LLMWSError({"message": f"expected a welcome, got {welcome.get('type')}"})
        if welcome["session_id"] != self.session_id:
            self.last_seq = 0  # a fresh session numbers from 1 again
        self.session_id = welcome["session_id"]
        self.welcome = welcome
        self._connected.set()

    async def _read_forever(self) -> None:
        while True:
            try:
                async for raw in self._websocket:
                    self._route(json.loads(raw))
            except ConnectionClosed:
                pass
            except Exception as exc:  # a callback failed (a closed stdout, say): end every waiter with it
                self._fail_all(exc)
                await self._websocket.close()
                return
            self._connected.clear()
            if self._closing or not await self._reconnect():
                self._fail_all(ConnectionError("connection to the server lost"))
                return

    async def _reconnect(self) -> bool:
        code = self._websocket.close_code
        if code is not None and code not in RETRY_CLOSE_CODES:
            return False  # refused, or taken over by another connection: retrying would not help
        for attempt in range(self.retries):
            delay = min(0.2 * 2 ** attempt, 5) * (0.5 + random.random())
            self.on_status(f"connection lost, reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)
            try:
                await self._open()
            except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError):
                continue
            if not self.welcome["resumed"]:  # the server restarted: what was in flight is gone
                for stream in self._streams.values():
                    stream.put_nowait(ConnectionError("the server lost the session (restarted?)"))
            self.on_status("reconnected")
            return True
        return False

    def _route(self, message: dict) -> None:
        if self.on_message:
            self.on_message(message)
        seq = message.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # already seen
            self.last_seq = seq
            stream = self._streams.get(message.get("request_id"))
            if stream is not None:
                stream.put_nowait(message)
            elif "request_id" not in message:
                for listener in self._listeners:
                    listener.put_nowait(message)
                if message["type"] == "log" and not self._listeners:
                    self.on_status(message["message"])  # news for everyone, such as a model switch
        else:
            self._replies.put_nowait(message)

    def _fail_all(self, exc: Exception) -> None:
        for queue in [self._replies, *self._listeners, *self._streams.values()]:
            queue.put_nowait(exc)

    async def disconnect(self, send_ack=True) -> None:
        if send_ack and self._connected.is_set():
            try:
                await self.ack()
            except (ConnectionError, LLMWSError):
                pass
        self._closing = True
        if self._websocket is not None:
            await self._websocket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc_info):
        await self.disconnect()

    # -- sending ---------------------------------------------------------------------------------

    async def _send(self, message: dict) -> None:
        """Send once the connection is up; after a drop, wait for the reconnect and send again."""
        for _ in range(2):
            await asyncio.wait_for(self._connected.wait(), 60)
            try:
                await self._websocket.send(json.dumps(message))
                return
            except ConnectionClosed:
                await asyncio.sleep(0.05)
        raise ConnectionError("could not send to the server")

    async def _ask(self, message: dict, answer_type: str) -> dict:
        """Send a frame and return its direct answer (error: LLMWSError)."""
        async with self._ask_lock:
            await self._send(message)
            reply = await self._next(self._replies)
        if reply["type"] == "error":
            raise LLMWSError(reply)
        if reply["type"] != answer_type:
            raise LLMWSError({"message": f"expected {answer_type}, got {reply['type']}"})
        return reply

    @staticmethod
    async def _next(queue: asyncio.Queue):
        item = await queue.get()
        if isinstance(item, Exception):
            queue.put_nowait(item)  # every later waiter learns it too
            raise item
        return item

    # -- the API ---------------------------------------------------------------------------------

    async def stream(self, prompt=None, system=None, messages=None, images=None, **config):
        """Yield the answer's text pieces as they arrive. Queue positions go to `on_status`. `images` (paths
        or bytes) go with the prompt, or with the last user turn of `messages`."""
        request_id = str(uuid.uuid4())
        message = {"type": "inference", "request_id": request_id}
        if messages is not None:
            message["messages"] = messages
        else:
            message["prompt"] = {"system": system, "user": prompt} if system else {"user": prompt}
        if images:
            message["images"] = [image_data_url(image) for image in images]
        if config:
            message["config"] = config
        stream = self._streams[request_id] = asyncio.Queue()
        try:
            item = (await self._send_and_wait(message, stream))[0]
            if "seq" not in item:  # a direct answer to an inference is a refusal (bad field, Queue full)
                raise LLMWSError(item)
            while True:
                if item["type"] == "token":
                    yield item["data"]
                elif item["type"] == "queued":
                    self.on_status(f"queued: {item['position']} ahead")
                elif item["type"] == "error":
                    raise LLMWSError(item)
                elif item["type"] == "done":
                    self.last_done = item
                    break
                item = await self._next(stream)
        finally:
            del self._streams[request_id]
        if not self._streams:  # nothing else in flight: the server may drop the buffer
            await self.ack()

    async def _send_and_wait(self, message: dict, queue: asyncio.Queue) -> list[dict]:
        """Send a frame that starts a stream or task and wait for what answers it first: a direct reply
        (an error, or download_started) and/or the first numbered message on `queue`, in that order."""
        async with self._ask_lock:
            await self._send(message)
            replies = asyncio.create_task(self._next(self._replies))
            first = asyncio.create_task(self._next(queue))
            done, pending = await asyncio.wait({replies, first}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        return [task.result() for task in (replies, first) if task in done]

    async def inference(self, prompt=None, system=None, messages=None, on_token=None, images=None, **config) -> str:
        """The whole answer; `on_token(text)` sees each piece as it arrives."""
        pieces = []
        async for piece in self.stream(prompt, system, messages, images, **config):
            pieces.append(piece)
            if on_token:
                on_token(piece)
        return "".join(pieces)

    async def set_config(self, **settings) -> dict:
        return (await self._ask({"type": "config", "data": settings}, "config_ack"))["config"]

    async def get_resources(self) -> dict:
        return await self._ask({"type": "get_resources"}, "resources")

    async def list_models(self) -> list:
        return (await self._ask({"type": "list_models"}, "models_list"))["models"]

    async def cancel(self, request_id=None) -> dict:
        message = {"type": "cancel", **({"request_id": request_id} if request_id else {})}
        return await self._ask(message, "cancelled")

    async def ack(self) -> dict:
        return await self._ask({"type": "ack"}, "ack_received")

    async def delete_model(self, name: str) -> dict:
        return await self._ask({"type": "delete_model", "model_name": name}, "model_deleted")

    async def switch_model(self, path: str, on_log=None) -> dict:
        return await self._follow({"type": "switch_model", "model_path": path}, "model_switched", on_log)

    async def download_model(self, repo: str, target_dir: str, on_log=None) -> dict:
        return await self._follow({"type": "download_model", "repo": repo, "target_dir": target_dir},
                                  "download_done", on_log)

    async def _follow(self, message: dict, final_type: str, on_log) -> dict:
        """A long task (switch, download): its log lines go to `on_log` until `final_type` or an error."""
        events = asyncio.Queue()
        self._listeners.add(events)
        try:
            ready = await self._send_and_wait(message, events)
            while True:
                event = ready.pop(0) if ready else await self._next(events)
                if event["type"] == "error":
                    raise LLMWSError(event)
                if event["type"] == final_type:
                    return event
                if event["type"] == "log" and on_log:
                    on_log(event["message"])
        finally:
            self._listeners.discard(events)


IMAGE_TYPES = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"GIF8": "gif", b"RIFF": "webp", b"BM": "bmp"}


def image_data_url(image) -> str:
    """A data URL of an image file's path or of its bytes (a data URL passes as it is)."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    data = image if isinstance(image, bytes) else Path(image).expanduser().read_bytes()
    kind = next((name for magic, name in IMAGE_TYPES.items() if data.startswith(magic)), None)
    if kind is None:
        raise ValueError(f"{image if not isinstance(image, bytes) else 'the bytes'} is not a PNG, JPEG, GIF, WebP "
                         "or BMP image")
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


# -- command line --------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="LLMWS client: chat, or one answer with --prompt.")
    parser.add_argument("--prompt", help="one-shot: answer this prompt and exit ('-' reads stdin)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="one-shot: an image to ask about (repeat for several; needs a vision model)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--max-tokens", type=int, dest="max_new_tokens")
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--session", help="take up an earlier session by its id")
    parser.add_argument("--token", default=os.environ.get("LLMWS_TOKEN"), help="auth token (or $LLMWS_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with wss://")
    parser.add_argument("--json", action="store_true", help="one-shot: print the raw protocol messages")
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
        return f"cannot reach the server at {args.host}:{args.port} ({exc or 'timed out'})"
    return str(exc)


async def one_shot(args, prompt: str) -> int:
    print_json = (lambda message: print(json.dumps(message, ensure_ascii=False), flush=True)) if args.json else None
    client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                 on_status=lambda text: print(f"[{text}]", file=sys.stderr), on_message=print_json)
    await client.connect()
    try:
        if args.json:
            print_json(client.welcome)
        await client.inference(prompt, system=args.system, on_token=None if args.json else _write,
                               images=args.image, **generation_config(args))
        if not args.json:
            print(flush=True)
        return 0
    finally:
        await client.disconnect(send_ack=False)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

# -- interactive mode ----------------------------------------------------------------------------

HELP = """Commands:
  /config key=value ...   change generation settings (temperature, top_p, top_k, max_new_tokens, ...)
  /system [text]          set the system prompt (no text: none)
  /image <path>           attach an image to your next question (again for more; needs a vision model)
  /resources              device, memory, model, context limit
  /models                 the models on the server
  /switch <path>          load another model (models/NAME or var/models/NAME)
  /download <repo> <dir>  download a model into models/<dir>
  /delete <name>          delete a model from var/models/
  /session                show this session's id
  /cancel                 stop the running answer (Ctrl-C does the same)
  /clear                  start a new conversation
  /help                   this text
  /quit                   leave (Ctrl-D does the same)"""


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths)] + lines[1:])


def parse_settings(words: list[str]) -> dict:
    """key=value words; values are read as JSON where they parse (0.8, 50, true), else as text."""
    settings = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not key:
            raise ValueError(f"expected key=value, got {word!r}")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


class Repl:
    """A chat in the terminal. The client runs on an event loop in a background thread, so the main
    thread can read lines and turn Ctrl-C into a cancel."""

    def __init__(self, args):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="llm-client", daemon=True).start()
        self.client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                          on_status=lambda text: print(f"\r[{text}]", file=sys.stderr))
        self.system = args.system
        self.settings = generation_config(args)
        self.history = []
        self.attached = [image_data_url(path) for path in args.image]  # data URLs for the next question

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def run(self) -> int:
        welcome = self.call(self.client.connect())
        print(f"Connected to {welcome['model']} on {welcome['resources']['device']}, "
              f"session {welcome['session_id']}. /help for commands, Ctrl-D to leave.")
        _load_history()
        try:
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    print()
                    break
                except KeyboardInterrupt:
                    print()
                    continue
                if line and not self.handle(line):
                    break
        finally:
            _save_history()
            self.call(self.client.disconnect())
        return 0

    def handle(self, line: str) -> bool:
        """Act on one line; False means leave."""
        try:
            if not line.startswith("/"):
                self.chat(line)
                return True
            command, *words = line.split()
            if command == "/quit":
                return False
            action = self.commands().get(command)
            if action is None:
                print(f"unknown command {command}; /help lists them")
            else:
                action(words, line[len(command):].strip())
        except LLMWSError as exc:
            print(f"error: {exc}")
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}")
        except ConnectionError as exc:
            print(f"error: {exc}")
            return False
        return True

    def commands(self) -> dict:
        return {"/config": self.do_config, "/system": self.do_system, "/resources": self.do_resources,
                "/models": self.do_models, "/switch": self.do_switch, "/download": self.do_download,
                "/delete": self.do_delete, "/session": lambda words, rest: print(self.client.session_id),
                "/cancel": self.do_cancel, "/clear": self.do_clear, "/image": self.do_image,
                "/help": lambda words, rest: print(HELP)}

    def do_image(self, words, rest):
        if not rest:
            raise ValueError("usage: /image <path>")
        self.attached.append(image_data_url(rest))
        print(f"attached {Path(rest).name} ({len(self.attached)} image{'s' * (len(self.attached) > 1)} "
              "for your next question)")

    def chat(self, text: str) -> None:
        turn = {"role": "user", "content": text}
        if self.attached:  # the images stay in the history with the question they went with
            turn["content"] = [{"type": "image_url", "image_url": {"url": url}} for url in self.attached] + [
                {"type": "text", "text": text}]
            self.attached = []  # sent, or refused: either way they do not go again
        system = [{"role": "system", "content": self.system}] if self.system else []
        future = asyncio.run_coroutine_threadsafe(
            self.client.inference(messages=system + self.history + [turn], on_token=_write, **self.settings),
            self.loop)
        while True:
            try:
                answer = future.result()
                break
            except KeyboardInterrupt:
                self._cancel_quietly()
        done = self.client.last_done
        print(f"\n[{done['total_tokens']} tokens, {done['tokens_per_s']} tokens/s"
              f"{'' if done['finish_reason'] == 'stop' else ', ' + done['finish_reason']}]")
        self.history += [turn, {"role": "assistant", "content": answer}]

    def _cancel_quietly(self) -> None:
        try:
            self.call(self.client.cancel())
        except (LLMWSError, KeyboardInterrupt):
            pass  # it had just finished

    def do_config(self, words, rest):
        if not words:
            raise ValueError("usage: /config key=value ...")
        changes = parse_settings(words)
        config = self.call(self.client.set_config(**changes))
        for key in changes:  # the session's new value now rules, not the command line's
            self.settings.pop(key, None)
        print(", ".join(f"{key}={value}" for key, value in config.items()))

    def do_system(self, words, rest):
        self.system = rest or None
        print(f"system prompt: {self.system!r}" if self.system else "no system prompt")

    def do_resources(self, words, rest):
        figures = self.call(self.client.get_resources())
        cuda, cpu = figures["cuda"], figures["cpu"]
        rows = [["model", figures["model"]["name"]],
                ["max context", self.client.welcome["capabilities"]["max_context"]]]
        if cuda:
            rows += [["device", cuda["device"]],
                     ["GPU memory", f"{cuda['total_gb'] - cuda['free_gb']:.1f} GB used, {cuda['free_gb']:.1f} GB free "
                                    f"of {cuda['total_gb']:.1f} GB"]]
        rows += [["CPU", f"{cpu['processor']} ({cpu['cores']} cores)"],
                 ["RAM", f"{cpu['available_gb']:.1f} GB free of {cpu['total_gb']:.1f} GB, "
                         f"server uses {cpu['process_rss_gb']:.2f} GB"]]
        print(table(["resource", "value"], rows))

    def do_models(self, words, rest):
        models = self.call(self.client.list_models())
        print(table(["name", "source", "size MB", "path"],
                    [[m["name"], m["source"], m["size_mb"], m["path"]] for m in models]) if models else "no models")

    def do_switch(self, words, rest):
        if len(words) != 1:
            raise ValueError("usage: /switch <path>")
        print(self.call(self.client.switch_model(words[0], on_log=print))["message"])

    def do_download(self, words, rest):
        """Runs in the background: the chat goes on, progress lines appear as they come."""
        if len(words) != 2:
            raise ValueError("usage: /download <repo> <dir>")
        future = asyncio.run_coroutine_threadsafe(
            self.client.download_model(words[0], words[1], on_log=lambda text: print(f"\r[download] {text}")),
            self.loop)
        future.add_done_callback(_report_download)
        print(f"downloading {words[0]} into models/{words[1]} in the background")

    def do_delete(self, words, rest):
        if len(words) != 1:
            raise ValueError("usage: /delete <name>")
        print(self.call(self.client.delete_model(words[0]))["message"])

    def do_cancel(self, words, rest):
        print(f"cancelled {self.call(self.client.cancel())['request_id']}")

    def do_clear(self, words, rest):
        self.history = []
        print("new conversation")


def _report_download(future) -> None:
    error = future.exception()
    if error:
        print(f"\r[download] error: {error}")
    else:
        print(f"\r[download] done: {future.result()['model']['path']}")


HISTORY_FILE = os.path.expanduser("~/.llmws_history")


def _load_history():
    try:
        import readline
        readline.read_history_file(HISTORY_FILE)
    except (ImportError, OSError):
        pass


def _save_history():
    try:
        import readline
        readline.set_history_length(1000)
        readline.write_history_file(HISTORY_FILE)
    except (ImportError, OSError):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    prompt = args.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    try:
        if prompt is None:
            return Repl(args).run()
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
