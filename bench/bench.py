#!/usr/bin/env python3
"""Benchmark: LLMWS against raw `model.generate` and `transformers serve`, same model, prompt and greedy
settings, in one run. Prints a table, writes bench/results/bench.json and bench/results/bench.png.

    python bench/bench.py [--quick] [--model DIR] [--targets raw,llmws,...] [--no-serve] [--rounds 3]

Targets: raw (model.generate in-process, no streamer: the limit of eager transformers), llmws (the server
with the shipped config.json: batching on), llmws-mixed (the same, its clients half greedy and half
sampled, a third with a repetition penalty), llmws-alone (max_batch_size 1), serve and serve-cb
(transformers serve), llamacpp (llama-cpp-python in-process on the default model's GGUF), llmws-gguf (this
server on that GGUF).

Tokens are tokens: what the server's `done` (or the API's usage) counts, never streamed pieces; chars/s
beside them is the rate that no chunking changes.

Every target stays up for the whole run and the rounds go over them in alternating order, so a slow
minute on a noisy machine falls on all of them alike; each row is the median over the rounds.

It runs itself in bench/.venv (made on first use, with the system's packages visible), where it installs
matplotlib and transformers[serving]; neither is a requirement of the server.
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from common import REPO, PeakMemory, free_port, start_server

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv"
PROMPT = "Write a long story about a dragon who learns to program computers."


def ensure_venv() -> None:
    """Re-run inside bench/.venv, creating it first if need be."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "matplotlib", "transformers[serving]", "fastapi"],
                       check=True)
    os.execv(str(python), [str(python), *sys.argv])


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


# -- targets ---------------------------------------------------------------------------------------

class RawGenerate:
    """The limit: generate() in this process, one request at a time, with no streamer (a streamer consumed
    in a second thread slows generate() itself). Its time to first token is a generate() of one token."""

    name = "raw generate"

    def __init__(self, model_dir, max_tokens):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if not torch.cuda.is_available()
                                                          else torch.bfloat16, device_map="auto")
        self.max_tokens = max_tokens
        self.pid = os.getpid()

    def run(self, clients: int) -> list[Stream]:
        return [self._one() for _ in range(clients)]

    def _generate(self, inputs, max_tokens):
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

        gguf = next(Path(model_dir).glob("*.gguf"))
        self.name = f"llama-cpp-python {gguf.name}"
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or psutil.cpu_count(logical=False) or None  # as the server
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


class LLMWSTarget:
    def __init__(self, model_dir, max_tokens, folder, batch=None, mixed=False):
        self.name = "llmws" + (" llama.cpp" if "GGUF" in str(model_dir) else "") + (
            " one at a time" if batch == 1 else "") + (" mixed settings" if mixed else "")
        self.port, self.max_tokens, self.mixed = free_port(), max_tokens, mixed
        # The shipped config.json, but room for 32 clients from one address (it allows 10, 8 per address)
        config = {"limits": {"max_clients": 40, "max_clients_per_ip": 40}}
        if batch:
            config["optimization"] = {"max_batch_size": batch}
        self.process = start_server(model_dir, self.port, folder, config)
        self.pid = self.process.pid

    def run(self, clients: int) -> list[Stream]:
        return asyncio.run(self._run(clients))

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
                await websocket.send(json.dumps({"type": "inference", "prompt": {"user": PROMPT}, "config": {
                    "max_new_tokens": self.max_tokens, **self.settings(index)}}))
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
        self.name = "transformers serve" + (" --continuous-batching" if batching else "")
        self.port, self.max_tokens, self.model = free_port(), max_tokens, str(model_dir)
        cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        command = [sys.executable, "-c", cli, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   *(["--continuous-batching"] if batching else []), self.model]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.pid = self.process.pid
        deadline = time.monotonic() + 300
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

    def _one(self) -> Stream:
        body = json.dumps({"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": PROMPT}]}).encode()
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


# -- measuring -------------------------------------------------------------------------------------

def measure(target, clients: int, repeats: int) -> dict:
    """Run `clients` requests at once, `repeats` times: every stream's timings, the wall time, peak memory."""
    memory = PeakMemory(target.pid)
    streams, elapsed = [], 0.0
    for _ in range(repeats):
        started = time.monotonic()
        streams += target.run(clients)
        elapsed += time.monotonic() - started
    memory.running = False
    return {"streams": streams, "elapsed": elapsed, "peak": memory.peak}


def summarize(name: str, clients: int, runs: list[dict]) -> dict:
    """One table row from a case's rounds: medians over every stream and over the rounds' aggregates."""
    streams = [stream for run in runs for stream in run["streams"]]
    aggregates = [sum(stream.tokens for stream in run["streams"]) / run["elapsed"] for run in runs]
    return {"target": name, "clients": clients, "rounds": len(runs), "streams": len(streams),
            "ttft_p50_s": round(statistics.median(stream.ttft for stream in streams), 3),
            "ttft_max_s": round(max(stream.ttft for stream in streams), 3),
            "decode_tokens_per_s": round(statistics.median(stream.decode_rate for stream in streams), 2),
            "end_to_end_tokens_per_s": round(statistics.median(stream.end_to_end_rate for stream in streams), 2),
            "decode_chars_per_s": round(statistics.median(stream.chars_rate for stream in streams), 1),
            "aggregate_tokens_per_s": round(statistics.median(aggregates), 2),
            "aggregate_per_round": [round(value, 2) for value in aggregates],
            "peak_rss_mb": round(max(run["peak"] for run in runs) / 1024 ** 2),
            "texts": sorted({stream.text for stream in streams}) if "mixed" not in name else []}


def chart(rows, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a machine with no package index: the numbers are in bench.json
        print("no chart: matplotlib is not installed")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(row["target"] for row in rows):
        mine = [row for row in rows if row["target"] == name]
        left.plot([r["clients"] for r in mine], [r["aggregate_tokens_per_s"] for r in mine], marker="o", label=name)
        right.plot([r["clients"] for r in mine], [r["ttft_p50_s"] for r in mine], marker="o", label=name)
    left.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="Throughput")
    right.set(xlabel="concurrent clients", ylabel="p50 time to first token (s)", title="Latency", yscale="log")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


TARGETS = ["raw", "llmws", "llmws-mixed", "llmws-alone", "serve", "serve-cb", "llamacpp", "llmws-gguf"]
GGUF_MODEL = REPO / "models" / "SmolLM2-135M-Instruct-GGUF"


def make_target(kind: str, model: str, max_tokens: int, folder: Path):
    return {"raw": lambda: RawGenerate(model, max_tokens),
            "llamacpp": lambda: LlamaCppTarget(GGUF_MODEL, max_tokens),
            "llmws-gguf": lambda: LLMWSTarget(GGUF_MODEL, max_tokens, folder),
            "llmws": lambda: LLMWSTarget(model, max_tokens, folder),
            "llmws-mixed": lambda: LLMWSTarget(model, max_tokens, folder, mixed=True),
            "llmws-alone": lambda: LLMWSTarget(model, max_tokens, folder, batch=1),
            "serve": lambda: ServeTarget(model, max_tokens, False),
            "serve-cb": lambda: ServeTarget(model, max_tokens, True)}[kind]()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--quick", action="store_true", help="32 tokens, 1 and 4 clients, one round")
    parser.add_argument("--clients", default="1,4,8,16,32", help="comma-separated client counts")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--no-serve", action="store_true", help="leave out transformers serve")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every target, for medians")
    parser.add_argument("--repeat", type=int, default=3, help="single-client requests per round")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    ensure_venv()
    import tempfile

    counts = [int(count) for count in args.clients.split(",")]
    max_tokens, counts, rounds = (32, [1, 4], 1) if args.quick else (128, counts, args.rounds)
    kinds = [kind for kind in args.targets.split(",") if not (args.no_serve and kind.startswith("serve"))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmws-bench-") as folder:
        targets = []
        try:
            for kind in kinds:
                (Path(folder) / kind).mkdir()
                targets.append(make_target(kind, args.model, max_tokens, Path(folder) / kind))
                targets[-1].run(1)  # warm-up
            one_at_a_time = (RawGenerate, LlamaCppTarget)
            cases = [(target, clients) for target in targets
                     for clients in ([1] if isinstance(target, one_at_a_time) or "one at a time" in target.name
                                     or "llama.cpp" in target.name else counts)]
            runs = {case: [] for case in cases}
            # Every target stays up and the rounds alternate their order, so a noisy minute hits them all alike.
            for number in range(rounds):
                for target, clients in (cases if number % 2 == 0 else cases[::-1]):
                    runs[target, clients].append(measure(target, clients, args.repeat if clients == 1 else 1))
                    print(f"  round {number + 1}: {target.name}, {clients} clients", file=sys.stderr)
        finally:
            for target in targets:
                target.stop()
    rows = [summarize(target.name, clients, case_runs) for (target, clients), case_runs in runs.items()]
    report(rows, max_tokens, out)
    return 0


def report(rows: list[dict], max_tokens: int, out: Path) -> None:
    texts = {text for row in rows for text in row["texts"]}
    print(f"\n{'target':44} {'clients':>7} {'aggregate tok/s':>15} {'e2e tok/s':>9} {'decode tok/s':>12} "
          f"{'chars/s':>8} {'TTFT p50':>9} {'TTFT max':>9} {'peak MB':>8}")
    for row in rows:
        print(f"{row['target']:44} {row['clients']:>7} {row['aggregate_tokens_per_s']:>15} "
              f"{row['end_to_end_tokens_per_s']:>9} {row['decode_tokens_per_s']:>12} {row['decode_chars_per_s']:>8} "
              f"{row['ttft_p50_s']:>8}s {row['ttft_max_s']:>8}s {row['peak_rss_mb']:>8}")
    summary = {"max_new_tokens": max_tokens, "prompt": PROMPT, "rows": rows}
    by_name = {(row["target"], row["clients"]): row for row in rows}
    raw, ours = by_name.get(("raw generate", 1)), by_name.get(("llmws", 1))
    if raw and ours:
        summary["end_to_end_ratio_1_client"] = ratio = ours["end_to_end_tokens_per_s"] / raw["end_to_end_tokens_per_s"]
        print(f"\nllmws / raw generate, 1 client: end-to-end tokens/s {ratio:.3f}, "
              f"TTFT {1000 * (ours['ttft_p50_s'] - raw['ttft_p50_s']):+.0f} ms")
    binding = next((row for row in rows if row["target"].startswith("llama-cpp-python") and row["clients"] == 1), None)
    gguf = by_name.get(("llmws llama.cpp", 1))
    if binding and gguf:
        summary["llamacpp_chars_ratio_1_client"] = ratio = gguf["decode_chars_per_s"] / binding["decode_chars_per_s"]
        print(f"llmws llama.cpp / llama-cpp-python, 1 client: text rate {ratio:.3f}, "
              f"TTFT {1000 * (gguf['ttft_p50_s'] - binding['ttft_p50_s']):+.0f} ms")
    for clients in sorted({row["clients"] for row in rows if row["clients"] > 1}):
        ours, serve = by_name.get(("llmws", clients)), by_name.get(("transformers serve --continuous-batching", clients))
        mixed = by_name.get(("llmws mixed settings", clients))
        if ours and serve:
            summary[f"vs_serve_cb_{clients}_clients"] = ratio = ours["aggregate_tokens_per_s"] / serve["aggregate_tokens_per_s"]
            print(f"llmws / serve --continuous-batching, {clients} clients: aggregate {ratio:.3f}, "
                  f"TTFT p50 {ours['ttft_p50_s']} s vs {serve['ttft_p50_s']} s")
        if ours and mixed:
            summary[f"mixed_vs_greedy_{clients}_clients"] = ratio = mixed["aggregate_tokens_per_s"] / ours["aggregate_tokens_per_s"]
            print(f"llmws mixed settings / all greedy, {clients} clients: aggregate {ratio:.3f}")
    print(f"identical texts across targets: {'yes' if len(texts) == 1 else f'no ({len(texts)} different)'}")
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    chart(rows, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


if __name__ == "__main__":
    sys.exit(main())
