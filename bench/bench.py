#!/usr/bin/env python3
"""Benchmark: LLMWS against raw `model.generate` and `transformers serve`, same model, prompt and greedy
settings, in one run. Prints a table, writes bench/results/bench.json and bench/results/bench.png.

    python bench/bench.py [--quick] [--model DIR] [--targets raw,llmws,...] [--no-serve] [--rounds 3]

Targets: raw (model.generate in-process, no streamer: the limit of eager transformers), llmws (the server
with the shipped config.json: batching on), llmws-mixed (the same, its clients half greedy and half
sampled, a third with a repetition penalty), llmws-json (every other client's answer constrained to a JSON
schema: the first's, so 1 client is constrained), llmws-alone (max_batch_size 1), serve and serve-cb
(transformers serve), llamacpp (llama-cpp-python in-process on the default model's GGUF), llmws-gguf (this
server on that GGUF), llama-server (llama.cpp's own server on that GGUF, from --llama-server PATH, with the
engine's slots, threads and context per sequence; its own flash attention default, on a CPU on),
llama-server-nofa (the same with flash attention off, as the engine: greedy texts are the engine's).

Tokens are tokens: what the server's `done` (or the API's usage) counts, never streamed pieces; chars/s
beside them is the rate that no chunking changes.

Every target stays up for the whole run and the rounds go over them in alternating order, so a slow
minute on a noisy machine falls on all of them alike; each row is the median over the runs. Single-client
targets take turns request by request, and their ratio to raw generate is the median over neighbouring
pairs.

It runs itself in bench/.venv (made on first use, with the system's packages visible), where it installs
matplotlib and transformers[serving]; neither is a requirement of the server.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, PeakMemory
from targets import GGUF_MODEL, PROMPT, TARGETS, LlamaCppTarget, RawGenerate, make_target

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv"


def ensure_venv() -> None:
    """Re-run inside bench/.venv, creating it first if need be."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "matplotlib", "transformers[serving]",
                        "fastapi"], check=True)
    os.execv(str(python), [str(python), *sys.argv])


# -- measuring -------------------------------------------------------------------------------------

def measure(target, clients: int) -> dict:
    """Run `clients` requests at once: every stream's timings, the wall time, peak memory."""
    memory = PeakMemory(target.pid)
    started = time.monotonic()
    streams = target.run(clients)
    elapsed = time.monotonic() - started
    memory.running = False
    return {"streams": streams, "elapsed": elapsed, "peak": memory.peak}


def run_rounds(cases: list, rounds: int, repeat: int) -> dict:
    """Every case's runs. Single-client cases take turns request by request (A B C, C B A, ...), so the
    n-th runs of two targets are neighbours in time and their ratio is free of the machine's drift; the
    many-client cases take turns by round."""
    runs = {case: [] for case in cases}
    singles = [case for case in cases if case[1] == 1]
    many = [case for case in cases if case[1] > 1]
    turn = 0
    for number in range(rounds):
        for _ in range(repeat):
            for target, clients in (singles if turn % 2 == 0 else singles[::-1]):
                runs[target, clients].append(measure(target, clients))
            turn += 1
        for target, clients in (many if number % 2 == 0 else many[::-1]):
            runs[target, clients].append(measure(target, clients))
        print(f"  round {number + 1} of {rounds} done", file=sys.stderr)
    return runs


def summarize(name: str, clients: int, runs: list[dict]) -> dict:
    """One table row from a case's runs: medians over every stream and over the runs' aggregates."""
    streams = [stream for run in runs for stream in run["streams"]]
    aggregates = [sum(stream.tokens for stream in run["streams"]) / run["elapsed"] for run in runs]
    return {"target": name, "clients": clients, "runs": len(runs), "streams": len(streams),
            "ttft_p50_s": round(statistics.median(stream.ttft for stream in streams), 3),
            "ttft_max_s": round(max(stream.ttft for stream in streams), 3),
            "decode_tokens_per_s": round(statistics.median(stream.decode_rate for stream in streams), 2),
            "end_to_end_tokens_per_s": round(statistics.median(stream.end_to_end_rate for stream in streams), 2),
            "decode_chars_per_s": round(statistics.median(stream.chars_rate for stream in streams), 1),
            "aggregate_tokens_per_s": round(statistics.median(aggregates), 2),
            "aggregate_per_run": [round(value, 2) for value in aggregates],
            "end_to_end_per_run": [round(statistics.median(stream.end_to_end_rate for stream in run["streams"]), 3)
                                   for run in runs],
            "ttft_per_run": [round(statistics.median(stream.ttft for stream in run["streams"]), 4) for run in runs],
            "chars_per_run": [round(statistics.median(stream.chars_rate for stream in run["streams"]), 1)
                              for run in runs],
            "peak_rss_mb": round(max(run["peak"] for run in runs) / 1024 ** 2),
            "texts": sorted({stream.text for stream in streams}) if "mixed" not in name and "json" not in name else []}


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



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--gguf", type=Path, default=GGUF_MODEL,
                        help="the GGUF model folder of the llamacpp and llmws-gguf targets (its name says GGUF)")
    parser.add_argument("--quick", action="store_true", help="32 tokens, 1 and 4 clients, one round")
    parser.add_argument("--clients", default="1,4,8,16,32", help="comma-separated client counts")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--no-serve", action="store_true", help="leave out transformers serve")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every target, for medians")
    parser.add_argument("--repeat", type=int, default=3, help="single-client requests per round")
    parser.add_argument("--llama-server", type=Path, help="the llama-server binary of the llama-server target")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    ensure_venv()
    import tempfile

    counts = [int(count) for count in args.clients.split(",")]
    max_tokens, counts, rounds = (32, [1, 4], 1) if args.quick else (128, counts, args.rounds)
    kinds = [kind for kind in args.targets.split(",") if not (args.no_serve and kind.startswith("serve"))]
    if "llmws-gguf" in kinds:  # started first: llama-server takes its max context
        kinds.remove("llmws-gguf")
        kinds.insert(0, "llmws-gguf")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmws-bench-") as folder:
        targets = []
        llama_server = {"binary": args.llama_server}
        try:
            for kind in kinds:
                (Path(folder) / kind).mkdir()
                targets.append(make_target(kind, args.model, max_tokens, Path(folder) / kind, args.gguf, llama_server))
                if kind == "llmws-gguf":  # llama-server gets the engine's context per sequence
                    llama_server["context_per_slot"] = targets[-1].capabilities()["max_context"]
                targets[-1].run(1)  # warm-up
            one_at_a_time = (RawGenerate, LlamaCppTarget)
            cases = [(target, clients) for target in targets
                     for clients in ([1] if isinstance(target, one_at_a_time) or "one at a time" in target.name
                                     else counts)]
            runs = run_rounds(cases, rounds, args.repeat)
        finally:
            for target in targets:
                target.stop()
    rows = [summarize(target.name, clients, case_runs) for (target, clients), case_runs in runs.items()]
    report(rows, max_tokens, out)
    return 0


def paired(ours: dict, base: dict) -> tuple[list, list]:
    """Two single-client rows' n-th runs, which ran next to each other: end-to-end rate ratios, TTFT
    differences (seconds)."""
    pairs = list(zip(zip(ours["end_to_end_per_run"], ours["ttft_per_run"]),
                     zip(base["end_to_end_per_run"], base["ttft_per_run"])))
    return [mine[0] / theirs[0] for mine, theirs in pairs], [mine[1] - theirs[1] for mine, theirs in pairs]


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
    raw = by_name.get(("raw generate", 1))
    for name in ("llmws", "llmws one at a time", "llmws mixed settings"):
        ours = by_name.get((name, 1))
        if raw and ours:
            ratios, ttfts = paired(ours, raw)
            key = "" if name == "llmws" else "_" + name.removeprefix("llmws ").replace(" ", "_")
            summary[f"end_to_end_ratio_1_client{key}"] = ratio = statistics.median(ratios)
            summary[f"ttft_difference_1_client_s{key}"] = statistics.median(ttfts)
            print(f"{name} / raw generate, 1 client: end-to-end tokens/s {ratio:.3f} (median of {len(ratios)} "
                  f"neighbouring pairs, {min(ratios):.3f} to {max(ratios):.3f}), "
                  f"TTFT {1000 * statistics.median(ttfts):+.0f} ms")
    binding = next((row for row in rows if row["target"].startswith("llama-cpp-python") and row["clients"] == 1), None)
    gguf = by_name.get(("llmws llama.cpp", 1))
    if binding and gguf:
        summary["llamacpp_chars_ratio_1_client"] = ratio = gguf["decode_chars_per_s"] / binding["decode_chars_per_s"]
        print(f"llmws llama.cpp / llama-cpp-python, 1 client: text rate {ratio:.3f}, "
              f"TTFT {1000 * (gguf['ttft_p50_s'] - binding['ttft_p50_s']):+.0f} ms")
    for clients in sorted({row["clients"] for row in rows}):
        ours = by_name.get(("llmws llama.cpp", clients))
        for peer in [row for row in rows if row["target"].startswith("llama-server") and row["clients"] == clients]:
            if not ours:
                break
            key = "vs_" + peer["target"].replace(" ", "_").replace("-", "_") + f"_{clients}_clients"
            summary[key] = ratio = ours["aggregate_tokens_per_s"] / peer["aggregate_tokens_per_s"]
            print(f"llmws llama.cpp / {peer['target']}, {clients} clients: aggregate tokens/s {ratio:.3f}, chars/s "
                  f"{ours['decode_chars_per_s'] / peer['decode_chars_per_s']:.3f}, TTFT p50 {ours['ttft_p50_s']} s "
                  f"vs {peer['ttft_p50_s']} s; per run: aggregate {ours['aggregate_per_run']} vs "
                  f"{peer['aggregate_per_run']}, chars/s {ours['chars_per_run']} vs {peer['chars_per_run']}, "
                  f"TTFT p50 {ours['ttft_per_run']} vs {peer['ttft_per_run']}")
    for clients in sorted({row["clients"] for row in rows if row["clients"] > 1}):
        ours, serve = (by_name.get(("llmws", clients)),
                       by_name.get(("transformers serve --continuous-batching", clients)))
        mixed = by_name.get(("llmws mixed settings", clients))
        if ours and serve:
            summary[f"vs_serve_cb_{clients}_clients"] = ratio = (ours["aggregate_tokens_per_s"]
                                                                 / serve["aggregate_tokens_per_s"])
            print(f"llmws / serve --continuous-batching, {clients} clients: aggregate {ratio:.3f}, "
                  f"TTFT p50 {ours['ttft_p50_s']} s vs {serve['ttft_p50_s']} s")
        if ours and mixed:
            summary[f"mixed_vs_greedy_{clients}_clients"] = ratio = (mixed["aggregate_tokens_per_s"]
                                                                     / ours["aggregate_tokens_per_s"])
            print(f"llmws mixed settings / all greedy, {clients} clients: aggregate {ratio:.3f}")
    for clients in sorted({row["clients"] for row in rows}):
        ours, shaped = by_name.get(("llmws", clients)), by_name.get(("llmws half json schema", clients))
        if ours and shaped:
            summary[f"half_json_vs_plain_{clients}_clients"] = ratio = (shaped["aggregate_tokens_per_s"]
                                                                        / ours["aggregate_tokens_per_s"])
            print(f"llmws half json schema / all plain, {clients} clients: aggregate {ratio:.3f}"
                  + (" (the one client is constrained)" if clients == 1 else ""))
    print(f"identical texts across targets: {'yes' if len(texts) == 1 else f'no ({len(texts)} different)'}")
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    chart(rows, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


if __name__ == "__main__":
    sys.exit(main())
