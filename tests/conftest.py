"""Fixtures: the real default model, a tiny random-weight model built here, and real servers on free ports."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmws_server.catalog.default_model import install_default_model  # noqa: E402
from llmws_server.config import DEFAULTS  # noqa: E402

TINY_MAX_POSITIONS = 4096
# The servers tests start share the machine with each other and with the tests: one torch thread each keeps
# them from starving one another on a busy machine.
SERVER_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """models/SmolLM2-135M-Instruct, installed once (it is also the tiny model's tokenizer)."""
    return install_default_model(REPO / "models")


@pytest.fixture(scope="session")
def tiny_model(default_model, tmp_path_factory) -> Path:
    return build_tiny_model(default_model, tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


def build_tiny_model(default_model: Path, out: Path, seed: int) -> Path:
    """A 2-layer Llama with random weights and the default model's tokenizer: fast and deterministic.
    It has no end-of-sequence token, so it always writes max_new_tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_POSITIONS,
                         initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=True)  # a wide init gives varied text, not one repeated token
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """python llmws.py in its own project folder, with its own config.json."""

    def __init__(self, root: Path, model: Path | None, overrides: dict, environment: dict | None = None):
        self.root = root
        self.port = free_port()
        self.config = json.loads(json.dumps(DEFAULTS))
        for section, values in overrides.items():
            self.config[section].update(values)
        # As the shipped config.json: generation settings from the model unless a test sets them
        self.config["generation_defaults"] = dict(overrides.get("generation_defaults", {}))
        self.config["server"]["host"] = "127.0.0.1"
        # The HTTP API only where a test asks for it (on a free port): servers run side by side.
        self.config["server"]["http_port"] = overrides.get("server", {}).get("http_port")
        if "max_clients_per_ip" not in overrides.get("limits", {}):  # every test client is 127.0.0.1
            self.config["limits"]["max_clients_per_ip"] = self.config["limits"]["max_clients"]
        (root / "config.json").write_text(json.dumps(self.config, indent=2))
        self.log = (root / "server.out").open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "llmws.py"), "--config", str(root / "config.json"), "--port", str(self.port)]
            + (["--model", str(model)] if model else []),
            cwd=root, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **SERVER_THREADS, **(environment or {})})
        self._wait_listening()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['http_port']}"

    @property
    def sessions_dir(self) -> Path:
        return self.root / "var" / "sessions"

    def output(self) -> str:
        return (self.root / "server.out").read_text()

    async def wait_for_output(self, text: str, timeout=60) -> str:
        """The server's output, once it holds `text` (polled to a deadline)."""
        for _ in range(timeout * 10):
            if text in (out := self.output()):
                return out
            await asyncio.sleep(0.1)
        raise AssertionError(f"{text!r} is not in the server's output after {timeout} s")

    def _wait_listening(self, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            if "listening on" in self.output():
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start a server: start_server(model, limits={...}, ...) -> ServerProcess, stopped after the module."""
    started = []

    def start(model_dir: Path | None, populate=None, environment=None, **overrides) -> ServerProcess:
        """populate(root) may fill the project folder before the server starts; overrides are config
        sections; environment adds variables to the server's."""
        root = tmp_path_factory.mktemp("project")
        if populate:
            populate(root)
        server = ServerProcess(root, model_dir, overrides, environment)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(start_server, tiny_model):
    return start_server(tiny_model)


ENGINES = ["transformers", "llama.cpp"]  # the params of a module's fixture that runs its tests on each engine


def engine_server(start_server, default_model: Path, engine: str, **config) -> ServerProcess:
    """The default model on `engine` (llama.cpp: its shipped GGUF, skipped without llama_cpp) with the HTTP API
    on a free port; config are more config sections."""
    if engine == "transformers":
        return start_server(default_model, server={"http_port": free_port()}, **config)
    pytest.importorskip("llama_cpp")
    gguf = default_model.parent / "SmolLM2-135M-Instruct-GGUF"
    return start_server(None, lambda root: shutil.copytree(gguf, root / "models" / "gguf"),
                        server={"http_port": free_port()}, model={"path": "models/gguf"}, **config)


class Client:
    """A bare protocol client over a real WebSocket: what the tests need and nothing more."""

    def __init__(self, websocket, welcome):
        self.ws = websocket
        self.welcome = welcome
        self.session_id = welcome["session_id"]

    @classmethod
    async def open(cls, url, hello=None, **connect_args):
        websocket = await connect(url, **connect_args)
        await websocket.send(json.dumps(hello if hello is not None else {}))
        welcome = json.loads(await asyncio.wait_for(websocket.recv(), 30))
        assert welcome["type"] == "welcome", welcome
        return cls(websocket, welcome)

    async def send(self, message: dict):
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout=60) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, message: dict, timeout=60) -> dict:
        """Send one message and return the next reply."""
        await self.send(message)
        return await self.recv(timeout)

    async def until(self, *types, timeout=120) -> list[dict]:
        """Messages up to and including the first whose type is one of `types`."""
        received = []
        while True:
            received.append(await self.recv(timeout))
            if received[-1]["type"] in types:
                return received

    async def until_done(self, message: dict, *types) -> list[dict]:
        """Send a message and return what follows up to its `done` or `error` (or one of `types`)."""
        await self.send(message)
        return await self.until("done", "error", *types)

    async def close(self):
        await self.ws.close()


async def refused_frame(url: str, frame: str | bytes) -> dict:
    """The reply to one raw frame on a new connection: an error, after which the connection still answers."""
    client = await Client.open(url)
    await client.ws.send(frame)
    reply = await client.recv()
    assert reply["type"] == "error", reply
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await client.close()
    return reply


def inference(user="Hello there", max_new_tokens=40, request_id=None, **config) -> dict:
    message = {"type": "inference", "prompt": {"user": user},
               "config": {"temperature": 0, "max_new_tokens": max_new_tokens, **config}}
    if request_id:
        message["request_id"] = request_id
    return message


def text_of(messages: list[dict]) -> str:
    return "".join(m["data"] for m in messages if m["type"] == "token")


BLOCKER = inference("block", max_new_tokens=4000, request_id="blocker")  # runs for seconds: cancel it when done
# The one-at-a-time worker, for tests of the queue: a blocker there makes every later request wait (with
# batching on, the default, they would generate beside it; test_batching covers its queue).
ONE_AT_A_TIME = {"max_batch_size": 1}
# What the batching tests send, on a server (test_batching) and in-process (unit/engines/transformers).
PROMPTS = ["Tell me about rivers", "A long story", "Name a colour", "Why is the sky blue?", "Count to ten",
           "What is a dragon?"]


@pytest.fixture(scope="session")
def vision_models(default_model, tmp_path_factory) -> dict[str, Path]:
    """Two tiny image-text models of different families: {"idefics3": folder, "llava": folder}."""
    from vision_models import build_idefics3, build_llava

    folder = tmp_path_factory.mktemp("vision")
    return {"idefics3": build_idefics3(default_model, folder / "tiny-idefics3"),
            "llava": build_llava(default_model, folder / "tiny-llava")}
