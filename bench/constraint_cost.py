#!/usr/bin/env python3
"""What a JSON schema costs each token of a request, without the model: the picker's own work on one row
of logits (engines/transformers/picking.py: the grammar's mask filled by llguidance, applied to the row,
the log-softmax and the argmax, the token consumed), with the mask applied as the picker does on the CPU
(llguidance's numpy kernel) and as llguidance.torch's torch.compile'd kernel does, on the default model's
vocabulary and the one-string schema of bench.py's llmws-json target. Milliseconds a token, each run and
the median.

    python bench/constraint_cost.py [--model models/SmolLM2-135M-Instruct] [--tokens 64] [--runs 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import llguidance.torch as guidance_torch  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from llmws_server.config import GenerationSettings  # noqa: E402
from llmws_server.engines.transformers.picking import Picker  # noqa: E402

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
ANSWER = '{"answer": "The river runs past the old mill and under the stone bridge, then out to the sea, where'


def per_token_ms(picker: Picker, ids: list[int], rows: torch.Tensor, torch_kernel: bool) -> float:
    """Picking the answer's tokens one by one (each row's logits put the answer's token on top)."""
    assert picker.matcher is not None
    started = time.perf_counter()
    for token, row in zip(ids, rows):
        scores = row.clone()
        scores[token] = 100.0
        if torch_kernel:
            guidance_torch.fill_next_token_bitmask(picker.matcher, picker.bitmask, 0)
            allowed = scores[: picker.bitmask.size(1) * 32].unsqueeze(0)
            guidance_torch.apply_token_bitmask_inplace(allowed, picker.bitmask)
        else:
            picker._mask(picker.matcher, scores)
        distribution = scores.log_softmax(-1)
        picker._note(int(distribution.argmax()), distribution)
    return (time.perf_counter() - started) / len(ids) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    guidance = llguidance.hf.from_tokenizer(tokenizer)
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)[:args.tokens]
    rows = torch.randn(len(ids), len(tokenizer))
    settings = GenerationSettings(len(ids), False, 0.0, 1.0, 0, 1.0, json_schema=SCHEMA)
    print(f"{args.model}: {len(tokenizer)} tokens in the vocabulary, {len(ids)} answer tokens, {args.runs} runs")
    for name, torch_kernel in (("numpy kernel (the picker on the CPU)", False), ("llguidance.torch kernel", True)):
        runs = [per_token_ms(Picker(settings, lambda: guidance, str, set()), ids, rows, torch_kernel)
                for _ in range(args.runs)]
        shown = ", ".join(f"{value:.3f}" for value in runs)
        print(f"{name:40} {statistics.median(runs):8.3f} ms a token (runs: {shown})")


if __name__ == "__main__":
    main()
