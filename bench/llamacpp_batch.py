#!/usr/bin/env python3
"""Does llama.cpp's multi-sequence decoding pay on this machine? One context, one sequence per request
(as llama.cpp's server slots do), greedy, decode steps only: aggregate tokens/s for 1, 2, 4 and 8
sequences, against one sequence. The server runs GGUF requests one at a time unless this says otherwise.

    python bench/llamacpp_batch.py [--model models/SmolLM2-135M-Instruct-GGUF] [--steps 128] [--threads N]
"""
import argparse
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import llama_cpp
import numpy as np
import psutil

from llmws_server.engines.llamacpp.engine import without_amx_buffers

PROMPT = b"<|im_start|>user\nWrite a long story about a river.<|im_end|>\n<|im_start|>assistant\n"


class Sequences:
    """A context for up to `most` sequences and a batch to feed it."""

    def __init__(self, gguf: Path, most: int, threads: int):
        with without_amx_buffers():  # as the server loads it
            self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                       verbose=False)
        self.vocab = self.llm.n_vocab()
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)  # as the server's
        params.n_ctx, params.n_seq_max, params.kv_unified = most * 640, most, False  # a KV stream per sequence
        self.context = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        self.batch = llama_cpp.llama_batch_init(512, 0, most)
        self.prompt = self.llm.tokenize(PROMPT, special=True)

    def _put(self, index, token, position, sequence, logits):
        batch = self.batch
        batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, position, 1
        batch.seq_id[index][0], batch.logits[index] = sequence, logits

    def _decode(self, count) -> None:
        self.batch.n_tokens = count
        if llama_cpp.llama_decode(self.context, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index) -> int:
        logits = llama_cpp.llama_get_logits_ith(self.context, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def run(self, count: int, steps: int) -> tuple[float, list[list[int]]]:
        """(aggregate tokens/s over the decode steps, each sequence's tokens)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.context), True)
        last = []
        for sequence in range(count):  # the prompts, one sequence each
            for index, token in enumerate(self.prompt):
                self._put(index, token, index, sequence, index == len(self.prompt) - 1)
            self._decode(len(self.prompt))
            last.append(self._argmax(len(self.prompt) - 1))
        tokens = [[] for _ in range(count)]
        started = time.perf_counter()
        for step in range(steps):  # every sequence advances one token per decode
            for sequence in range(count):
                self._put(sequence, last[sequence], len(self.prompt) + step, sequence, True)
            self._decode(count)
            for sequence in range(count):
                last[sequence] = self._argmax(sequence)
                tokens[sequence].append(last[sequence])
        return count * steps / (time.perf_counter() - started), tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct-GGUF"))
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best is kept")
    args = parser.parse_args()
    gguf = args.model if args.model.suffix == ".gguf" else next(args.model.glob("*.gguf"))
    sequences = Sequences(gguf, 8, args.threads)
    print(f"{gguf.name}, {args.threads} threads, {args.steps} greedy decode steps")
    one = None
    for count in (1, 2, 4, 8):
        rate, tokens = max((sequences.run(count, args.steps) for _ in range(args.repeat)), key=lambda run: run[0])
        one = one or rate
        print(f"{count} sequences: {rate:7.1f} tok/s aggregate, {rate / count:6.1f} each, {rate / one:4.2f}x one; "
              f"same greedy tokens in every sequence: {all(t == tokens[0] for t in tokens)}")


if __name__ == "__main__":
    main()
