"""llm.py's interactive chat: a REPL whose client runs on an event loop in a background thread."""
import asyncio
import json
import os
import queue
import sys
import threading
from pathlib import Path

from rich.console import Console

from llm_view import make_view
from llmws_client import LLMWSEnhancedClient, LLMWSError, image_data_url

HELP = """Commands:
  /config [key=value ...] show, or change, the generation settings (temperature, top_p, top_k, max_new_tokens, ...)
  /system [text]          set the system prompt (no text: none)
  /image <path>           attach an image to your next question (again for more; needs a vision model)
  /resources              device, memory, model, context limit
  /models                 the models on the server
  /switch <path>          load another model (models/NAME or var/models/NAME)
  /download <repo> <dir> [file.gguf]   download a model into models/<dir> (only that GGUF file of the repo)
  /delete <name>          delete a model from var/models/
  /train <file.jsonl> [key=value ...]   LoRA-train the served model (max_steps, learning_rate, ...,
                          checkpoint_name=NAME); the result is a new model in var/models/
  /snapshot <name>        save the served model as var/models/<name>
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

    def __init__(self, args, settings: dict):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="llm-client", daemon=True).start()
        self.client = LLMWSEnhancedClient(args.host, args.port, args.session, args.token, args.tls,
                                          on_status=self.on_status)
        self.plain = args.plain
        self.console = None if args.plain else Console()
        self.answer_events = None  # while an answer streams: its pieces and statuses, for the main thread
        self.system = args.system
        self.settings = settings  # the command line's generation options
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
                try:
                    if line and not self.handle(line):
                        break
                except KeyboardInterrupt:  # Ctrl-C landed between reading the line and waiting on the answer
                    self._cancel_quietly()
                    print()
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
                "/delete": self.do_delete, "/train": self.do_train, "/snapshot": self.do_snapshot,
                "/session": lambda words, rest: print(self.client.session_id),
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
        events = self.answer_events = queue.Queue()  # the answer is shown by this thread alone
        future = asyncio.run_coroutine_threadsafe(self.client.inference(
            messages=system + self.history + [turn], on_token=lambda piece: events.put(("token", piece)),
            **self.settings), self.loop)
        future.add_done_callback(lambda _: events.put(("end", None)))
        view = make_view(self.plain, self.console)
        try:
            self._show(events, view)
        except KeyboardInterrupt:  # nothing more is shown once Ctrl-C is in
            view.stop()
            self._cancel_quietly()
        finally:
            self.answer_events = None
        while True:
            try:
                answer = future.result()
                break
            except KeyboardInterrupt:
                self._cancel_quietly()
            except Exception:  # refused or failed: the view ends before the error is printed
                view.finish()
                raise
        done = self.client.last_done
        view.finish(f"[{done['total_tokens']} tokens, {done['tokens_per_s']} tokens/s"
                    f"{'' if done['finish_reason'] == 'stop' else ', ' + done['finish_reason']}]")
        self.history += [turn, {"role": "assistant", "content": answer}]

    @staticmethod
    def _show(events: queue.Queue, view) -> None:
        while True:
            kind, text = events.get()
            if kind == "end":
                return
            (view.add if kind == "token" else view.status)(text)

    def on_status(self, text: str) -> None:
        """Queue positions and news; while an answer streams they go through its view."""
        events = self.answer_events
        if events is not None:
            events.put(("status", text))
        else:
            print(f"\r[{text}]", file=sys.stderr)

    def _cancel_quietly(self) -> None:
        try:
            self.call(self.client.cancel())
        except (LLMWSError, KeyboardInterrupt):
            pass  # it had just finished

    def do_config(self, words, rest):
        if not words:  # the settings the next question goes with: the session's, under the command line's
            config = {**self.call(self.client.set_config()), **self.settings}
            print(", ".join(f"{key}={value}" for key, value in config.items()))
            return
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
        if len(words) not in (2, 3):
            raise ValueError("usage: /download <repo> <dir> [file.gguf]")
        file = words[2] if len(words) == 3 else None
        future = asyncio.run_coroutine_threadsafe(self.client.download_model(
            words[0], words[1], on_log=lambda text: print(f"\r[download] {text}"), file=file), self.loop)
        future.add_done_callback(_report_download)
        print(f"downloading {words[0]} into models/{words[1]} in the background")

    def do_delete(self, words, rest):
        if len(words) != 1:
            raise ValueError("usage: /delete <name>")
        print(self.call(self.client.delete_model(words[0]))["message"])

    def do_train(self, words, rest):
        if not words:
            raise ValueError("usage: /train <file.jsonl> [key=value ...]")
        settings = parse_settings(words[1:])
        name = settings.pop("checkpoint_name", None)
        future = asyncio.run_coroutine_threadsafe(self.client.train(
            Path(words[0]).read_text(encoding="utf-8"), name, on_event=_show_training, **settings), self.loop)
        while True:
            try:
                done = future.result()
                break
            except KeyboardInterrupt:
                self._cancel_quietly()
        loss = "-" if done["loss"] is None else f"{done['loss']:.4f}"
        print(f"\n[train] {done['finish_reason']} after {done['steps']} steps, loss {loss}"
              + (f": saved as {done['checkpoint']} (/switch {done['checkpoint']})" if done["checkpoint"] else ""))

    def do_snapshot(self, words, rest):
        if len(words) != 1:
            raise ValueError("usage: /snapshot <name>")
        print(f"saved as {self.call(self.client.save_snapshot(words[0]))['path']}")

    def do_cancel(self, words, rest):
        print(f"cancelled {self.call(self.client.cancel())['request_id']}")

    def do_clear(self, words, rest):
        self.history = []
        print("new conversation")


def _show_training(event: dict) -> None:
    """A progress bar with the loss, redrawn in place."""
    if event["type"] == "train_progress":
        done = event["step"] / event["max_steps"]
        bar = "#" * int(30 * done)
        sys.stdout.write(f"\r[train] {bar:<30} {event['step']}/{event['max_steps']} loss {event['loss']:.4f} "
                         f"{event['tokens_per_s']:.0f} tokens/s")
        sys.stdout.flush()
    elif event["type"] == "train_checkpoint":
        print(f"\n[train] checkpoint {event['path']}")
    elif event["type"] == "train_started":
        print(f"[train] {event['examples']} examples, {event['config']['max_steps']} steps")


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
