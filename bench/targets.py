"""The benchmark's targets (bench.py): each runs the same request from N clients at once and returns
every stream's timings; tokens are counted as tokens (the server's `done`, the API's usage)."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from common import REPO, free_port, start_server

PROMPT = "Write a long story about a dragon who learns to program computers."


class Stream:
    """One request's timings."""

    def __init__(self):
        self.sent = time.monotonic()
        self.first = self.last = None
        self.tokens = 0
        self.text = ""
        self.first_chars = 0  # the first piece's length: rates count what came after it

    def piece(self, text: str) -> None:
        self.last = time.monotonic()
        if self.first is None:
            self.first, self.first_chars = self.last, len(text)
        self.text += text

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / max(self.last - self.first, 1e-9)

    @property
    def end_to_end_rate(self) -> float:
        """Tokens over the whole request, from sending it to its last token."""
        return self.tokens / max(self.last - self.sent, 1e-9)

    @property
    def chars_rate(self) -> float:
        return (len(self.text) - self.first_chars) / max(self.last - self.first, 1e-9)


class RawGenerate:
    """The limit: generate() in this process, one request at a time, with no streamer (a streamer consumed
    in a second thread slows generate() itself), under inference_mode and with the attention setting the
    server uses on a CPU (SDPA sharing key/value heads itself), so the server gains nothing the baseline
    lacks. Its time to first token is a generate() of one token."""

    name = "raw generate"

    def __init__(self, model_dir, max_tokens):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch.cuda.is_available():
            # as llmws_server.engines.transformers.engine.avoid_cudnn_attention
            torch.backends.cuda.enable_cudnn_sdp(False)
        else:
            # as llmws_server.engines.transformers.engine.use_grouped_query_sdpa
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                          dtype=torch.float32 if not torch.cuda.is_available()
                                                          else torch.bfloat16, device_map="auto")
        self.max_tokens = max_tokens
        self.pid = os.getpid()

    def run(self, clients: int) -> list[Stream]:
        return [self._one() for _ in range(clients)]

    def _generate(self, inputs, max_tokens):
        import torch

        with torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                       top_p=None, top_k=None, repetition_penalty=1.0)

    def _one(self) -> Stream:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True)
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        started = time.monotonic()
        self._generate(inputs, 1)
        ttft = time.monotonic() - started
        stream = Stream()
        out = self._generate(inputs, self.max_tokens)
        generated = out[0, inputs["input_ids"].shape[1]:]
        stream.piece("")  # the first token's time is the one-token generate's
        stream.first = stream.sent + ttft
        stream.piece(self.tokenizer.decode(generated, skip_special_tokens=True))
        stream.tokens = len(generated)
        return stream

    def stop(self):
        pass


class LlamaCppTarget:
    """The limit for the llama.cpp engine: llama-cpp-python's own create_chat_completion in this process,
    streamed, one request at a time, on the GGUF's chat template."""

    def __init__(self, model_dir, max_tokens):
        from llama_cpp import Llama

        from llmws_server.engines.llamacpp.engine import without_amx_buffers

        gguf = next(Path(model_dir).glob("*.gguf"))
        self.name = f"llama-cpp-python {gguf.name}"
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or psutil.cpu_count(logical=False) or None  # as the server
        with without_amx_buffers():  # as the server loads it
            self.llama = Llama(str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False,
                               chat_format="chat_template.default")
        self.max_tokens, self.pid = max_tokens, os.getpid()

    def run(self, clients: int) -> list[Stream]:
        return [self._one() for _ in range(clients)]

    def _one(self) -> Stream:
        stream = Stream()
        for chunk in self.llama.create_chat_completion([{"role": "user", "content": PROMPT}], temperature=0,
                                                       max_tokens=self.max_tokens, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                stream.piece(piece)
                stream.tokens += 1  # llama-cpp-python streams one token per chunk
        return stream

    def stop(self):
        self.llama.close()


# llmws-mixed: client i's settings, in turn (a third penalised): greedy ones give the same text as alone.
MIXED = [{"temperature": 0}, {"temperature": 0.7}, {"temperature": 0, "repetition_penalty": 1.1},
         {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0}, {"temperature": 0.7, "repetition_penalty": 1.1}]


# llmws-json: every other client (the first included) asks for JSON under this schema (constrained decoding);
# its one string is longer than max_new_tokens can write, so a constrained answer runs as long as a plain one
# (a short one would be mostly its first token's wait, and a rate of it no rate of decoding).
STORY = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]}}}


class LLMWSTarget:
    def __init__(self, model_dir, max_tokens, folder, batch=None, mixed=False, json_half=False, replicas=0):
        self.name = "llmws" + (" llama.cpp" if "GGUF" in str(model_dir) else "") + (
            " one at a time" if batch == 1 else "") + (" mixed settings" if mixed else "") + (
            " half json schema" if json_half else "") + (f" {replicas} Ray replicas" if replicas else "")
        self.port, self.max_tokens, self.mixed, self.json_half = free_port(), max_tokens, mixed, json_half
        # The shipped config.json, but room for 32 clients from one address (it allows 10, 8 per address)
        config = {"limits": {"max_clients": 40, "max_clients_per_ip": 40}}
        if batch:
            config["optimization"] = {"max_batch_size": batch}
        if replicas:  # a local Ray cluster, one CPU a replica
            config["replicas"] = {"ray_address": "local", "count": replicas, "num_cpus": 1}
        self.process = start_server(model_dir, self.port, folder, config)
        self.pid = self.process.pid

    def run(self, clients: int) -> list[Stream]:
        return asyncio.run(self._run(clients))

    def capabilities(self) -> dict:
        """The welcome's engine capabilities (max_context among them)."""
        async def ask():
            from websockets.asyncio.client import connect

            async with connect(f"ws://127.0.0.1:{self.port}") as websocket:
                await websocket.send("{}")
                return json.loads(await websocket.recv())["capabilities"]
        return asyncio.run(ask())

    def settings(self, index: int) -> dict:
        if self.mixed:
            return {"repetition_penalty": 1.0, **MIXED[index % len(MIXED)]}
        return {"temperature": 0, "repetition_penalty": 1.0}

    async def _run(self, clients):
        from websockets.asyncio.client import connect

        async def one(index):
            async with connect(f"ws://127.0.0.1:{self.port}") as websocket:
                await websocket.send("{}")
                await websocket.recv()
                stream = Stream()
                shape = {"response_format": STORY} if self.json_half and index % 2 == 0 else {}
                await websocket.send(json.dumps({"type": "inference", "prompt": {"user": PROMPT}, "config": {
                    "max_new_tokens": self.max_tokens, **self.settings(index)}, **shape}))
                async for raw in websocket:
                    message = json.loads(raw)
                    if message["type"] == "token":
                        stream.piece(message["data"])
                    elif message["type"] == "done":
                        stream.tokens = message["total_tokens"]
                        await websocket.send('{"type": "ack"}')
                        return stream
        return await asyncio.gather(*(one(index) for index in range(clients)))

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


class ServeTarget:
    """`transformers serve` (OpenAI-compatible SSE), optionally with continuous batching."""

    def __init__(self, model_dir, max_tokens, batching):
        import torch

        self.name = "transformers serve" + (" --continuous-batching" if batching else "")
        self.port, self.max_tokens, self.model = free_port(), max_tokens, str(model_dir)
        cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        # On a GPU it runs in the dtype the server and raw generate() use there (its "auto" is the file's float32)
        command = [sys.executable, "-c", cli, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   *(["--continuous-batching"] if batching else []),
                   *(["--dtype", "bfloat16"] if torch.cuda.is_available() else []), self.model]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.pid = self.process.pid
        self._wait_until_up(300)

    def _wait_until_up(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{self.name} did not start")

    def run(self, clients: int) -> list[Stream]:
        streams = [None] * clients
        threads = [threading.Thread(target=lambda i=i: streams.__setitem__(i, self._one())) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return streams

    def body(self) -> dict:
        return {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPT}]}

    def _one(self) -> Stream:
        body = json.dumps(self.body()).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        stream = Stream()
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    stream.tokens = chunk["usage"].get("completion_tokens", stream.tokens)
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        stream.piece(piece)
                        stream.tokens += 0 if chunk.get("usage") else 1
        return stream

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


class LlamaServerTarget(ServeTarget):
    """llama.cpp's own `llama-server` (OpenAI-compatible SSE), from the binary given on the command line, on
    the GGUF the llmws llama.cpp target serves: as many slots as that engine's batch, its thread count and
    its context per sequence (llama-server splits -c over the slots, one KV stream each, as batch.py
    does), without the extra (AMX/repacked) weight buffers where the engine loads without them, so both
    compute the same way. Flash attention is llama-server's own default ("auto": on, on a CPU) unless
    told; "off" is the engine's setting, and then greedy texts are the engine's too."""

    def __init__(self, gguf_dir, max_tokens, binary: Path, slots: int, context_per_slot: int,
                 flash_attn: str = "auto"):
        import llama_cpp

        gguf = next(Path(gguf_dir).glob("*.gguf"))
        self.name = f"llama-server -np {slots}" + (f" -fa {flash_attn}" if flash_attn != "auto" else "")
        self.port, self.max_tokens, self.model = free_port(), max_tokens, gguf.name
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or psutil.cpu_count(logical=False) or 1  # as the engine
        without_repack = ["-nr"] if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() else []  # as the engine
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(slots),
                   "-c", str(slots * context_per_slot), "-t", str(threads), "-tb", str(threads), "-fa", flash_attn,
                   *without_repack]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.process.pid
        self._wait_until_up(120)

    def body(self) -> dict:
        return {**super().body(), "stream_options": {"include_usage": True}}


TARGETS = ["raw", "llmws", "llmws-mixed", "llmws-json", "llmws-alone", "serve", "serve-cb", "llamacpp", "llmws-gguf",
           "llmws-ray1", "llmws-ray2", "llama-server", "llama-server-nofa"]
GGUF_MODEL = REPO / "models" / "SmolLM2-135M-Instruct-GGUF"


def gguf_context_length(gguf_dir: Path) -> int:
    """The GGUF's own context length: the llama.cpp engine's max context where memory and the shipped
    limits.max_context_length (128,000) allow it."""
    from llama_cpp import Llama

    probe = Llama(str(next(Path(gguf_dir).glob("*.gguf"))), vocab_only=True, verbose=False)
    metadata = probe.metadata
    probe.close()
    return min(128000, int(metadata[f"{metadata.get('general.architecture', 'llama')}.context_length"]))


def make_target(kind: str, model: str, max_tokens: int, folder: Path, gguf: Path = GGUF_MODEL,
                llama_server: dict | None = None):
    """llama_server: for those targets, {"binary", "context_per_slot"}."""
    if kind.startswith("llama-server"):
        from llmws_server.engines.llamacpp.engine import BATCH_SIZE  # the engine's slots under "auto"

        assert llama_server and llama_server.get("binary"), "the llama-server target needs --llama-server PATH"
        return LlamaServerTarget(gguf, max_tokens, llama_server["binary"], BATCH_SIZE,
                                 llama_server.get("context_per_slot") or gguf_context_length(gguf),
                                 "off" if kind == "llama-server-nofa" else "auto")
    return {"raw": lambda: RawGenerate(model, max_tokens),
            "llamacpp": lambda: LlamaCppTarget(gguf, max_tokens),
            "llmws-gguf": lambda: LLMWSTarget(gguf, max_tokens, folder),
            "llmws": lambda: LLMWSTarget(model, max_tokens, folder),
            "llmws-mixed": lambda: LLMWSTarget(model, max_tokens, folder, mixed=True),
            "llmws-json": lambda: LLMWSTarget(model, max_tokens, folder, json_half=True),
            "llmws-alone": lambda: LLMWSTarget(model, max_tokens, folder, batch=1),
            "llmws-ray1": lambda: LLMWSTarget(model, max_tokens, folder, replicas=1),
            "llmws-ray2": lambda: LLMWSTarget(model, max_tokens, folder, replicas=2),
            "serve": lambda: ServeTarget(model, max_tokens, False),
            "serve-cb": lambda: ServeTarget(model, max_tokens, True)}[kind]()
