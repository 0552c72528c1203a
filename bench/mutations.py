#!/usr/bin/env python3
"""Mutation run (issue #41): does a test catch each of these one-line bugs of the server?

    python bench/mutations.py                     # every mutation, one after another
    python bench/mutations.py --only cancel,413   # those whose names hold one of the words
    python bench/mutations.py --check             # each `old` is in its file exactly once; runs nothing
    python bench/mutations.py --list              # the mutations and the tests each runs
    python bench/mutations.py --baseline          # first run each one's tests unmutated: they must pass

Each mutation gets a copy of the working tree of its own (tracked and untracked files that git does not
ignore, so uncommitted work is what is mutated; models/ linked, not copied), has its one line changed
there, and runs its tests there: `python -m pytest -q -x -p no:cacheprovider <tests>`. Then the copy is
thrown away, so mutations never meet. One line per mutation: caught (a test failed: pytest's exit 1),
survived (they passed: exit 0), or broken (any other exit, such as 2 for a usage or collection error or 5
for no tests collected; a run past --timeout-s, 900 s unless told; a mutated file that does not compile;
with --baseline, tests that fail unmutated), with the seconds taken and, when broken, pytest's last lines.
Then a Markdown table of them all.

It takes long: each mutation runs its tests, which mostly start real servers (one to three minutes a
mutation, an hour or so for them all on 2 cores; those whose tests are unit tests, in tests/unit/, take
seconds). A mutation marked expect="survived" (`# no test yet` beside it)
breaks a rule no test checks yet: it is listed so that the gap shows, and reads as survived until a test
is written. Exits 1 when any result is not the one expected (a guarded rule that survived, a gap now
caught, or broken).
"""
import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 30


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in path
    new: str
    tests: list[str]  # pytest's arguments: files, node ids, -k expressions
    expect: str = "caught"  # "survived" where no test guards the rule yet


def k(file: str, expression: str) -> list[str]:
    return [f"tests/{file}", "-k", expression]


# The reconnect and soak tests of the Python client (llm.py), bench/soak.py and the page
CLIENT_RESUMES = ["tests/test_client.py", "tests/test_soak.py", "tests/test_web.py", "-k",
                  "reconnects_by_itself or first_message_a_cut_lost or soak or dropped_connection or lost_in_a_cut"]

MUTATIONS = [
    # -- issue #41's list --------------------------------------------------------------------------------
    Mutation("chat-unguarded", "llmws_server/http/openai.py",
             'api.endpoint(endpoints.chat), methods=["POST"]', 'api.endpoint(endpoints.chat, guarded=False), '
             'methods=["POST"]', k("test_openai.py", "token_and_the_origin")),
    Mutation("train-snapshot-not-admin", "llmws_server/ws/protocol.py",
             '"delete_model", "recheck_model", "train", "save_snapshot"}', '"delete_model", "recheck_model"}',
             k("test_handshake.py", "admin_token")),
    Mutation("admin-token-refused-over-http", "llmws_server/http/app.py",
             '(self.settings["auth_token"], self.settings["admin_token"])',
             '(self.settings["auth_token"] or self.settings["admin_token"],)',
             k("test_ollama.py", "need_the_admin_scope")),
    Mutation("images-black", "llmws_server/core/images.py",
             'return opened.convert("RGB")', 'return Image.new("RGB", opened.size)',
             k("test_vision.py", "depends_on_the_images_pixels")),
    Mutation("images-first-user-turn", "llmws_server/ws/protocol.py",
             'next((turn for turn in reversed(turns) if', 'next((turn for turn in turns if',
             k("test_vision.py", "go_with_the_last_user_turn")),
    Mutation("bare-cancel-newest", "llmws_server/ws/server.py",
             'or next(iter(session.jobs), None)', 'or next(reversed(session.jobs), None)',
             k("test_protocol.py", "bare_cancel_stops_the_oldest")),
    Mutation("http-413-64x", "llmws_server/http/doors.py",
             'length > self.server["max_message_size"]:', 'length > self.server["max_message_size"] * 64:',
             k("test_doors.py", "impossible_content_length")),
    Mutation("queue-full-400", "llmws_server/http/app.py",
             'APIError(str(exc), status=429, kind="rate_limit_error")',
             'APIError(str(exc), status=400, kind="invalid_request_error")',
             k("test_lockout.py", "full_queue_answers_an_http_request_429")),
    Mutation("download-same-target-twice", "llmws_server/catalog/downloads.py",
             "if name in self.active:", "if destination in self.active:",
             k("test_models.py", "not_downloaded_twice_at_once")),
    Mutation("switch-keeps-defaults", "llmws_server/core/model_control.py",
             "self.generation_defaults.clear()", "self.generation_defaults = dict(self.generation_defaults)",
             k("test_models.py", "brings_the_new_models_generation_defaults")),
    Mutation("sse-queue-comment", "llmws_server/http/openai.py",
             'yield ServerSentEvent(comment=f"queued:', 'ServerSentEvent(comment=f"queued:',
             k("test_fifo.py", "told_its_place_in_an_sse_comment")),
    # the one edit of two lines: the turn's parts, text first
    Mutation("images-after-text", "llmws_server/engines/transformers/engine.py",
             '[{"type": "image"} for _ in m.get("images", ())]\n'
             '                  + [{"type": "text", "text": m["content"]}]}',
             '[{"type": "text", "text": m["content"]}]\n'
             '                  + [{"type": "image"} for _ in m.get("images", ())]}',
             k("test_vision.py", "reach_the_model_before_its_text")),
    Mutation("responses-instructions", "llmws_server/http/responses_state.py",
             'turns = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []',
             "turns = []", k("test_openai.py", "instructions_are_the_system_turn")),
    Mutation("ready-never-503", "llmws_server/http/app.py",
             "200 if ready else 503)", "200 if ready is not None else 503)",
             ["tests/test_replicas.py", "tests/test_models.py", "-k", "gone or ready_is_503"]),  # Ray or not
    Mutation("admin-origins-ignored", "llmws_server/ws/handshake.py",
             'if origin is None or origin in self.settings["admin_origins"]:', "if origin is None:",
             k("test_handshake.py", "admin_origin")),
    Mutation("exact-max-context", "llmws_server/core/jobs.py",
             "if tokens_in >= engine.max_context:", "if tokens_in > engine.max_context:",
             k("test_protocol.py", "exactly_max_context_tokens")),
    # -- more rules of the README and docs/protocol.md ---------------------------------------------------
    Mutation("resume-replays-last-seq", "llmws_server/sessions/store.py",
             'if record["seq"] > after_seq:', 'if record["seq"] >= after_seq:',
             k("test_sessions.py", "resume_after_drops")),
    # the client and the page drop what they have seen: their reconnect and soak tests check the seq itself
    Mutation("client-resume-replays-all", "llmws_server/sessions/store.py",
             'if record["seq"] > after_seq:', 'if record["seq"] > 0:', CLIENT_RESUMES),
    Mutation("client-resume-replays-last-seq", "llmws_server/sessions/store.py",
             'if record["seq"] > after_seq:', 'if record["seq"] >= after_seq:', CLIENT_RESUMES),
    # claims that had no test (#41)
    Mutation("position-rate-unpaced", "llmws_server/core/worker.py",
             "POSITION_UPDATE_S = 0.25", "POSITION_UPDATE_S = 0.0", k("test_fifo.py", "quarter_second")),
    Mutation("max-completion-tokens-ignored", "llmws_server/http/openai_shapes.py",
             '"max_completion_tokens": "max_new_tokens", "top_k"', '"top_k"',
             k("test_openai.py", "max_completion_tokens")),
    Mutation("five-stops-taken", "llmws_server/http/openai_shapes.py",
             "MAX_STOPS, MAX_STOP_CHARS = 4, 256", "MAX_STOPS, MAX_STOP_CHARS = 5, 256",
             k("test_openai.py", "four_stop")),
    Mutation("sessions-kept-an-hour", "llmws_server/core/service.py",
             "SESSION_IDLE_S = 24 * 3600", "SESSION_IDLE_S = 3600", k("unit/sessions/test_store.py", "left_for_a_day")),
    Mutation("expiry-at-half-the-idle-time", "llmws_server/sessions/store.py",
             "if seconds > (UNUSED_IDLE_S if session.seq == 0 else idle_s)]",
             "if seconds > (UNUSED_IDLE_S if session.seq == 0 else idle_s / 2)]",
             k("unit/sessions/test_store.py", "left_for_a_day")),
    Mutation("ready-during-a-switch", "llmws_server/core/model_control.py",
             'return self.worker.alive() and self.status()["status"] == ModelStatus.OK.value',
             "return self.worker.alive()", k("test_models.py", "ready_is_503")),
    Mutation("webp-refused", "llmws_server/core/images.py",
             'FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}', 'FORMATS = {"PNG", "JPEG", "GIF", "BMP"}',
             k("test_vision.py", "jpeg_gif_webp")),
    Mutation("fair-queue-fifo", "llmws_server/core/fairqueue.py",
             "self.lanes.setdefault(lane_of(job.session),", "self.lanes.setdefault(lane_of(job),",
             k("test_limits.py", "newcomer_waits_behind")),
    Mutation("clients-per-ip-off-by-one", "llmws_server/ws/server.py",
             '>= self.limits["max_clients_per_ip"]:', '> self.limits["max_clients_per_ip"]:',
             k("test_limits.py", "connections_per_address")),
    Mutation("per-client-queue-off-by-one", "llmws_server/sessions/store.py",
             "if len(self.jobs) >= most:", "if len(self.jobs) > most:",
             k("test_fifo.py", "per_client_queue_limit")),
    Mutation("stop-string-kept", "llmws_server/http/runs.py",
             'ready, self.held = self.held[:at], ""', 'ready, self.held = self.held[:at + len(self.stop)], ""',
             k("unit/http/test_runs.py", "stop_string")),
    Mutation("anthropic-stop-reason", "llmws_server/http/anthropic_shapes.py",
             'return "stop_sequence" if stop_sequence is not None else STOP_REASONS[reason]',
             "return STOP_REASONS[reason]", k("test_anthropic.py", "stop_sequence_ends")),
    Mutation("ollama-num-ctx-answer-only", "llmws_server/http/ollama.py",
             "most - tokens)))", "most)))", k("test_ollama.py", "num_ctx")),
    Mutation("ollama-tools-never-auto", "llmws_server/http/ollama_shapes.py",
             'checked_tools(body.get("tools"), body.get("tool_choice"))',
             'checked_tools(body.get("tools"), body.get("tool_choice") or "none")', k("test_ollama.py", "by_itself")),
    Mutation("origin-prefix-match", "llmws_server/access.py",
             'return f"{parts.scheme}://{parts.hostname}" in allowed',
             "return any(origin.startswith(entry) for entry in allowed)", k("test_handshake.py", "browser_origins")),
    Mutation("ws-admin-token-refused", "llmws_server/ws/handshake.py",
             "(admin and same_secret(presented_token(request), admin))",
             "(admin and same_secret(presented_token(request), token))",
             k("test_handshake.py", "both_tokens")),
    # HTTP streams resume (docs/protocol.md, "Resuming an HTTP stream"), sessions over a restart
    Mutation("stream-resume-replays-all", "llmws_server/http/streams.py",
             "for record in self.session.records(after, upto):", "for record in self.session.records(0, upto):",
             k("test_stream_resume.py", "resumed_on_the_post or read_again_by_get")),
    Mutation("stream-kept-without-readers", "llmws_server/http/streams.py",
             "            self.run.cancel()", "            self.run.done()",
             k("test_stream_resume.py", "nobody_comes_back")),
    Mutation("restart-cut-request-silent", "llmws_server/sessions/store.py",
             "        for request_id in running:", "        for request_id in ():",
             k("test_restart.py", "taken_up_after_a_restart and kill")),
    Mutation("clean-stop-not-told", "llmws_server/core/service.py",
             "        self.sessions.close()", "        pass",
             k("test_restart.py", "taken_up_after_a_restart and clean")),
    Mutation("restart-keep-ignored", "llmws_server/core/service.py",
             'if self.config.server["keep_sessions_over_restart"]:', "if False:",
             k("test_restart.py", "only_what_it_had_not_seen")),
    # the pixels of one request's images together (#43.5)
    Mutation("request-pixels-unbounded", "llmws_server/core/images.py",
             "    if total > most:", "    if total > most * 64:", k("test_vision.py", "bad_images")),
    # a short job takes no batch slot (core/batching.py)
    Mutation("embedding-waits-for-a-slot", "llmws_server/core/batching.py",
             "if not job.runs_beside_batch and len(self.members) + self.starting + slots",
             "if len(self.members) + self.starting + slots", k("test_embeddings.py", "full_batch")),
    Mutation("solo-end-waits-for-its-last-word", "llmws_server/engines/transformers/batching.py",
             "if item.finished:  # nothing of this run follows; a request added now starts alone",
             "if False:", k("unit/engines/transformers/test_batching.py", "right_after_a_solo_run")),
    Mutation("doubled-authorization", "llmws_server/access.py",
             'SINGLE_HEADERS = ("host", "origin", "authorization", "x-api-key")',
             'SINGLE_HEADERS = ("host", "origin", "x-api-key")', k("test_doors.py", "doubled_header")),
]


@dataclass
class Result:
    mutation: Mutation
    outcome: str  # caught, survived, broken
    seconds: float
    tail: str = ""


def problem_of(mutation: Mutation, root: Path = REPO) -> str | None:
    """Why the mutation cannot be applied in `root` as written, or None."""
    file = root / mutation.path
    if not file.is_file():
        return f"{mutation.path} does not exist"
    count = file.read_text(encoding="utf-8").count(mutation.old)
    if count != 1:
        return f"`old` occurs {count} times in {mutation.path}"
    if mutation.old == mutation.new:
        return "`new` is `old`"
    if mutation.expect not in ("caught", "survived"):
        return f"expect must be caught or survived, not {mutation.expect!r}"
    for arg in mutation.tests:
        if arg.startswith("tests/") and not (root / arg.split("::")[0]).is_file():
            return f"no test file {arg.split('::')[0]}"
    if mutation.path.endswith(".py"):
        try:
            compile(mutated_text(mutation, root), mutation.path, "exec")
        except SyntaxError as exc:
            return f"the mutated file does not compile: {exc}"
    return None


def mutated_text(mutation: Mutation, root: Path) -> str:
    return (root / mutation.path).read_text(encoding="utf-8").replace(mutation.old, mutation.new, 1)


def copy_tree(destination: Path) -> None:
    """The working tree as it is, uncommitted changes and untracked files included (git's ignored ones
    not), and a link to each entry of models/ (the default model's folders, ignored by git)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, destination / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_dir():  # a submodule
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    models = destination / "models"
    models.mkdir(exist_ok=True)
    for entry in (REPO / "models").iterdir():
        if not (models / entry.name).exists():
            (models / entry.name).symlink_to(entry.resolve())


def run_tests(root: Path, tests: list[str], timeout_s: float) -> tuple[int | None, str]:
    """pytest's exit status (None: it ran past timeout_s and was stopped) and its output. It runs in a process
    group of its own, ended at the close with whatever it started that is still there (a server, say)."""
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                               cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    status: int | None = None
    try:
        output, _ = process.communicate(timeout=timeout_s)
        status = process.returncode
    except subprocess.TimeoutExpired:
        output = ""
        for sent in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sent)
            try:
                output = (process.communicate(timeout=20)[0] or "") + f"\n(stopped after {timeout_s:.0f} s)"
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return status, output


def tail(output: str) -> str:
    return "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])


def run(mutation: Mutation, timeout_s: float, baseline: bool) -> Result:
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"llmws-mutation-{mutation.name}-") as folder:
        root = Path(folder)
        copy_tree(root)
        problem = problem_of(mutation, root)
        if problem:
            return Result(mutation, "broken", time.monotonic() - begun, problem)
        if baseline:
            status, output = run_tests(root, mutation.tests, timeout_s)
            if status != 0:
                return Result(mutation, "broken", time.monotonic() - begun,
                              f"fails unmutated (exit {status}):\n{tail(output)}")
        (root / mutation.path).write_text(mutated_text(mutation, root), encoding="utf-8")
        status, output = run_tests(root, mutation.tests, timeout_s)
    outcome = "survived" if status == 0 else "caught" if status == 1 else "broken"
    exit_status = "none (timed out)" if status is None else status
    shown = "" if outcome != "broken" else f"pytest exit {exit_status}:\n{tail(output)}"
    return Result(mutation, outcome, time.monotonic() - begun, shown)


def table(results: list[Result]) -> str:
    rows = ["| mutation | file | tests | expected | result | s |", "|---|---|---|---|---|---|"]
    for result in results:
        mutation = result.mutation
        tests = " ".join(mutation.tests).replace("|", "\\|")
        mark = "" if result.outcome == mutation.expect else " **!**"
        rows.append(f"| {mutation.name} | {mutation.path} | `{tests}` | {mutation.expect} | "
                    f"{result.outcome}{mark} | {result.seconds:.0f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated words: the mutations whose names hold one")
    parser.add_argument("--check", action="store_true", help="only check that each `old` occurs once; run nothing")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout-s", type=float, default=900, help="per mutation's test run (default 900)")
    parser.add_argument("--baseline", action="store_true", help="first run each mutation's tests unmutated")
    args = parser.parse_args()
    chosen = MUTATIONS
    if args.only:
        words = [word.strip() for word in args.only.split(",") if word.strip()]
        chosen = [mutation for mutation in MUTATIONS if any(word in mutation.name for word in words)]
        if not chosen:
            print(f"no mutation's name holds any of: {', '.join(words)}", file=sys.stderr)
            return 2
    names = [mutation.name for mutation in MUTATIONS]
    if len(set(names)) != len(names):
        print("two mutations share a name", file=sys.stderr)
        return 1
    width = max(len(mutation.name) for mutation in chosen)
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name:<{width}}  {mutation.path}  {' '.join(mutation.tests)}  (expect {mutation.expect})")
        return 0
    if args.check:
        bad = 0
        for mutation in chosen:
            problem = problem_of(mutation)
            bad += problem is not None
            print(f"{'BAD' if problem else 'ok':<4} {mutation.name:<{width}}  {problem or mutation.path}")
        return 1 if bad else 0
    results = []
    for mutation in chosen:
        result = run(mutation, args.timeout_s, args.baseline)
        results.append(result)
        print(f"{result.outcome:<8} {mutation.name:<{width}}  ({result.seconds:.1f} s)", flush=True)
        if result.tail:
            print("    " + result.tail.replace("\n", "\n    "), flush=True)
    print()
    print(table(results))
    return 1 if any(result.outcome != result.mutation.expect for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
