"""A scripted engine (engines.api's interface, no model) and a recording session, for the workers' tests."""
import threading
import time
from pathlib import Path

from llmws_server.engines.api import Progress, Prompt
from llmws_server.ws import wire


class ScriptedBatch:
    """Each request gains one token per look and finishes at its max_tokens; the log says when."""

    def __init__(self, engine):
        self.engine, self.requests, self.added = engine, {}, 0

    def add(self, prompt, max_tokens, settings):
        name = f"request-{self.added}"
        self.added += 1
        self.requests[name] = [prompt.ids[0], 0, max_tokens]
        kind = "sampled" if settings.sampled else "greedy"
        self.engine.events.append(("add", prompt.ids[0], kind + (" penalised" if settings.penalized else "")))
        return name

    def cancel(self, request):
        self.requests.pop(request)

    def progress(self, timeout):
        time.sleep(timeout)
        found = []
        for name, state in list(self.requests.items()):
            state[1] += 1
            finished = state[1] >= state[2]
            if finished:
                self.requests.pop(name)
                self.engine.events.append(("end", state[0]))
            found.append(Progress(name, "x", state[1], finished))
        return found

    def failure(self):
        return None

    def close(self):
        self.engine.events.append(("close",))


class ScriptedEngine:
    """Prompts are one token, the request's number; every request batches."""
    name, path, vision, max_context, params, device, dtype_name = "scripted", Path("x"), False, 100, 1, "cpu", "-"
    chat_template = None

    def __init__(self):
        self.events = []

    def encode(self, messages, tools=None):
        return Prompt([int(messages[-1]["content"])])

    def batchable(self, images):
        return not images

    def open_batch(self, slots):
        self.events.append(("open", slots))
        return ScriptedBatch(self)

    def generate(self, prompt, settings, max_new_tokens, on_text, should_stop):
        self.events.append(("alone", prompt.ids[0]))
        on_text("x")
        return 1, "stop"

    def is_out_of_memory(self, exc):
        return False


class Recorder:
    """A session: it keeps what the jobs emit, and says when every request has ended."""

    def __init__(self, expected):
        self.messages, self.expected, self.all_done = [], expected, threading.Event()

    def emit(self, stamped):
        message = wire.CODEC.encode(stamped)
        self.messages.append(message)
        if sum(m["type"] in ("done", "error") for m in self.messages) == self.expected:
            self.all_done.set()
