"""llm.py against a real server: the Python API, automatic reconnect, one-shot mode and the REPL."""
import asyncio
import json
import os
import re
import subprocess
import sys

import pexpect
import pytest
from conftest import REPO, free_port

from llm import LLMWSEnhancedClient, LLMWSError

GREEDY = {"temperature": 0, "max_new_tokens": 60}


def client_for(server, **kwargs) -> LLMWSEnhancedClient:
    return LLMWSEnhancedClient(host="127.0.0.1", port=server.port, **kwargs)


@pytest.fixture(scope="module")
def reference_text(tiny_server):
    async def answer():
        async with client_for(tiny_server) as client:
            return await client.inference("Tell me about rivers", **GREEDY)
    return asyncio.run(answer())


async def test_api_methods_work_as_the_seed_shows(tiny_server, reference_text):
    client = client_for(tiny_server)
    welcome = await client.connect()
    assert welcome["type"] == "welcome" and client.session_id == welcome["session_id"]
    config = await client.set_config(temperature=0.8, max_new_tokens=1024)
    assert config["temperature"] == 0.8 and config["max_new_tokens"] == 1024 and config["top_k"] == 50
    pieces = []
    text = await client.inference(prompt="Tell me about rivers", on_token=pieces.append, **GREEDY)
    assert text == reference_text == "".join(pieces) and len(pieces) > 5
    assert client.last_done["total_tokens"] == 60
    streamed = [piece async for piece in client.stream("Tell me about rivers", **GREEDY)]
    assert "".join(streamed) == reference_text
    with_system = await client.inference(prompt="What is AI?", system="You are a helpful assistant", **GREEDY)
    assert with_system and with_system != reference_text
    resources = await client.get_resources()
    assert resources["type"] == "resources" and resources["model"]["name"] == "tiny-llama"
    assert await client.list_models() == []
    with pytest.raises(LLMWSError):
        await client.switch_model("models/nothing-here")
    await client.disconnect(send_ack=True)
    assert not (tiny_server.sessions_dir / client.session_id / "buffer.jsonl").exists()


async def test_errors_raise_one_exception_class_with_their_fields(tiny_server):
    async with client_for(tiny_server) as client:
        with pytest.raises(LLMWSError) as caught:
            await client.inference("word " * 5000, **GREEDY)
        assert caught.value.max_context == 4096 and caught.value.input_length > 4096
        assert "Context too long" in str(caught.value)
        with pytest.raises(LLMWSError, match="top_p"):
            await client.inference("hi", top_p=7)
        with pytest.raises(LLMWSError, match="temperature"):
            await client.set_config(temperature=-2)
        assert (await client.inference("hi", max_new_tokens=3, temperature=0)) != ""  # still usable


async def test_cancel_from_the_api(tiny_server):
    async with client_for(tiny_server) as client:
        stream = client.stream("go on", temperature=0, max_new_tokens=4000)
        await stream.__anext__()
        await client.cancel()
        rest = [piece async for piece in stream]
        assert client.last_done["finish_reason"] == "cancelled" and len(rest) < 3999


async def test_answers_are_acked_so_buffers_do_not_pile_up(tiny_server):
    async with client_for(tiny_server) as client:
        await client.inference("hi", max_new_tokens=5, temperature=0)
        assert not (tiny_server.sessions_dir / client.session_id / "buffer.jsonl").exists()


class CuttableProxy:
    """A loopback TCP proxy whose live connections the test can cut, as a network fault would."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.writers = []
        # What happens to the client's next frame, after which the client's side is cut: "lose" (the server
        # never gets it) or "deliver" (it does, and its side stays open: only the answers are lost).
        self.next_frame = None

    async def start(self):
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [client_writer, server_writer]

        async def copy(reader, writer, from_client):
            try:
                while data := await reader.read(65536):
                    fate, self.next_frame = (self.next_frame, None) if from_client else (None, self.next_frame)
                    if fate != "lose":
                        writer.write(data)
                        await writer.drain()
                    if fate:
                        client_writer.transport.abort()
                        if fate == "lose":
                            server_writer.transport.abort()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
        try:
            await asyncio.gather(copy(client_reader, server_writer, True), copy(server_reader, client_writer, False))
        except asyncio.CancelledError:
            pass  # the test is over

    def cut(self):
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []

    async def stop(self):
        self.cut()
        self.server.close()


def resumes_in(messages: list) -> list[int]:
    """The indexes of the "reconnected" status entries among what a client's on_message and on_status saw."""
    return [index for index, m in enumerate(messages) if m.get("text") == "reconnected"]


def assert_each_resume_replays_from_the_next_seq(messages: list) -> None:
    """The protocol, not the client's own de-duplication: on each connection the numbered messages come
    with seq rising by one, and the first after a reconnect is the last one seen before it + 1 (no message
    replayed again, none skipped). `messages` is every message as the client received it (on_message sees
    them before it drops those it has seen) with a {"type": "status", "text": "reconnected"} entry where
    each new connection opened."""
    seen, resumed_at = 0, None
    for index, message in enumerate(messages):
        if message.get("text") == "reconnected":
            resumed_at = index
        elif "seq" in message:
            assert message["seq"] == seen + 1, (
                f"message {index} has seq {message['seq']} after seq {seen}"
                + (f" (the first after the reconnect at {resumed_at})" if resumed_at is not None else ""))
            seen, resumed_at = message["seq"], None


@pytest.fixture(scope="module")
def long_reference(tiny_server):
    async def answer():
        async with client_for(tiny_server) as client:
            return await client.inference("Tell me about rivers", **LONG)
    return asyncio.run(answer())


LONG = {"temperature": 0, "max_new_tokens": 400}  # still generating at every cut


@pytest.mark.parametrize("cuts_after", [[1], [3, 25], [2, 10, 30, 50]])
async def test_reconnects_by_itself_and_the_text_is_byte_identical(tiny_server, long_reference, cuts_after):
    proxy = CuttableProxy(tiny_server.port)
    await proxy.start()
    messages = []  # every message the client got, and a {"type": "status"} entry for each status line
    client = LLMWSEnhancedClient("127.0.0.1", proxy.port, on_message=messages.append,
                                 on_status=lambda text: messages.append({"type": "status", "text": text}))
    await client.connect()
    pieces = []
    async for piece in client.stream("Tell me about rivers", **LONG):
        pieces.append(piece)
        if len(pieces) in cuts_after:
            proxy.cut()
    assert "".join(pieces).encode() == long_reference.encode()
    assert client.last_done["total_tokens"] == 400 and client.welcome["resumed"] is True
    assert 1 <= len(resumes_in(messages)) <= len(cuts_after)  # a cut may land while the client still reconnects
    assert_each_resume_replays_from_the_next_seq(messages)
    await client.disconnect()
    await proxy.stop()


@pytest.mark.parametrize("fate", ["lose", "deliver"])
async def test_a_request_whose_first_message_a_cut_lost_is_sent_again_and_runs_once(tiny_server, fate):
    """The connection is cut just after the inference frame: lost with it, or delivered while its answers
    are lost. Either way the client sends the same frame again on the new connection, the server runs it
    once (a repeat of a frame it took is a retry), and the answer comes whole."""
    async with client_for(tiny_server) as direct:
        reference = await direct.inference("Name a colour", temperature=0, max_new_tokens=30)
    proxy = CuttableProxy(tiny_server.port)
    await proxy.start()
    messages = []
    client = LLMWSEnhancedClient("127.0.0.1", proxy.port, on_message=messages.append,
                                 on_status=lambda text: messages.append({"type": "status", "text": text}))
    await client.connect()
    retries = tiny_server.output().count("again after a cut")
    proxy.next_frame = fate
    text = await asyncio.wait_for(client.inference("Name a colour", temperature=0, max_new_tokens=30), 120)
    assert text == reference and client.last_done["total_tokens"] == 30
    assert tiny_server.output().count("again after a cut") - retries == (fate == "deliver")
    assert resumes_in(messages)
    assert_each_resume_replays_from_the_next_seq(messages)
    await client.disconnect()
    await proxy.stop()


def run_llm(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "llm.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_llm_py_help_lists_every_option_with_its_default():
    """`python llm.py --help` (no server needed) names each option the README lists, with its default, and
    examples."""
    result = run_llm("--help", timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    help_text = " ".join(result.stdout.split())  # argparse wraps its lines
    for option in ("--prompt", "--image", "--system", "--temperature", "--max-tokens", "--top-p", "--top-k",
                   "--host", "--port", "--session", "--token", "--tls", "--plain", "--json", "--json-schema FILE",
                   "--tools FILE", "--tool-choice"):
        assert f" {option}" in help_text, option
    for default in ("server host (default: localhost)", "server port (default: 8765)",
                    "(default: $LLMWS_TOKEN, else none)", "0 is greedy (default: the server's)",
                    "most tokens in an answer (default: the server's)", "(default: ws://)", "(default: auto)"):
        assert default in help_text, default
    assert "examples:" in result.stdout and "python llm.py --prompt" in result.stdout


def test_one_shot_prints_the_answer_and_exits_0(tiny_server, reference_text):
    result = run_llm("--prompt", "Tell me about rivers", "--port", str(tiny_server.port), "--host", "127.0.0.1",
                     "--temperature", "0", "--max-tokens", "60")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_text + "\n"


def test_one_shot_reads_a_piped_prompt_and_prints_json(tiny_server):
    result = run_llm("--port", str(tiny_server.port), "--host", "127.0.0.1", "--json", "--max-tokens", "5",
                     stdin="Tell me about rivers")
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["type"] for m in messages][:2] == ["welcome", "start"] and messages[-2]["type"] == "done"
    assert messages[-1]["type"] == "ack_received"
    dash = run_llm("--prompt", "-", "--port", str(tiny_server.port), "--host", "127.0.0.1", "--max-tokens", "5",
                   stdin="hello")
    assert dash.returncode == 0 and dash.stdout.strip()


def test_one_shot_fails_with_a_one_line_reason(tiny_server):
    unreachable = run_llm("--prompt", "hi", "--port", str(free_port()), "--host", "127.0.0.1")
    assert unreachable.returncode == 1 and "cannot reach the server" in unreachable.stderr
    assert "is `python llmws.py` running?" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    refused = run_llm("--prompt", "hi", "--port", str(tiny_server.port), "--host", "127.0.0.1",
                      "--temperature", "-1")
    assert refused.returncode == 1 and "temperature" in refused.stderr and refused.stdout == ""


def spawn_repl(server, home, *args):
    child = pexpect.spawn(sys.executable, [str(REPO / "llm.py"), "--port", str(server.port), "--host", "127.0.0.1",
                                           "--max-tokens", "40", *args],
                          env={**os.environ, "HOME": str(home), "TERM": "xterm-256color"}, encoding="utf-8",
                          timeout=60, dimensions=(40, 100))
    child.expect("/help for commands")
    child.expect("you> ")
    return child


@pytest.fixture
def repl(tiny_server, tmp_path):
    """The REPL with the answer's text as it streams (--plain), to compare it character by character."""
    child = spawn_repl(tiny_server, tmp_path, "--plain")
    yield child
    child.close(force=True)


def test_repl_chats_runs_commands_and_quits(repl, tmp_path):
    repl.sendline("Tell me about rivers")
    repl.expect(r"\[(\d+) tokens, [\d.]+ tokens/s")
    repl.expect("you> ")
    for command, expected in [("/help", "/download <repo> <dir>"), ("/session", r"[0-9a-f-]{36}"),
                              ("/config", "max_new_tokens=40, do_sample=True"),
                              ("/config temperature=0 max_new_tokens=8", "temperature=0"),
                              ("/config oops", "error: expected key=value"), ("/config top_p=9", "error: .*top_p"),
                              ("/resources", "max context +4096"), ("/models", "no models"),
                              ("/system Be terse.", "system prompt: 'Be terse.'"), ("/switch", "usage: /switch"),
                              ("/download a", "usage: /download"), ("/delete", "usage: /delete"),
                              ("/bogus", "unknown command"), ("/clear", "new conversation"),
                              ("/cancel", "error: No request to cancel")]:
        repl.sendline(command)
        repl.expect(expected)
        repl.expect("you> ")
    repl.sendline("Again")
    repl.expect(r"\[8 tokens")
    repl.expect("you> ")
    repl.sendline("/quit")
    repl.expect(pexpect.EOF)
    repl.wait()
    assert repl.exitstatus == 0
    assert "/config oops" in (tmp_path / ".llmws_history").read_text()


def test_repl_ctrl_c_cancels_the_answer_and_stays(repl):
    repl.sendline("/config temperature=0 max_new_tokens=4000")
    repl.expect("you> ")
    repl.sendline("Go on forever")
    repl.expect_exact("Go on forever\r\n")  # the terminal's echo of the line
    repl.expect(r"\S")  # the answer's first visible character: it has begun
    repl.sendintr()
    repl.expect(r"tokens/s, cancelled\]")
    after_interrupt = repl.before.rpartition("^C")[2]
    assert re.fullmatch(r"\s*\[\d+ tokens, [\d.]+ ", after_interrupt), after_interrupt  # no piece after the ^C
    repl.expect("you> ")
    repl.sendline("/session")
    repl.expect(r"[0-9a-f-]{36}")
    repl.sendeof()
    repl.expect(pexpect.EOF)


def test_the_repl_renders_markdown_on_a_terminal_and_ctrl_c_still_cancels(tiny_server, tmp_path):
    """Without --plain a terminal gets rich's live view: it takes the cursor while the answer streams."""
    repl = spawn_repl(tiny_server, tmp_path)
    try:
        repl.sendline("Tell me about rivers")
        repl.expect_exact("\x1b[?25l")  # rich's live display hides the cursor while it draws
        repl.expect(r"\[40 tokens, [\d.]+ tokens/s, length\]")
        repl.expect("you> ")
        repl.sendline("/config temperature=0 max_new_tokens=4000")
        repl.expect("you> ")
        repl.sendline("Go on forever")
        repl.expect_exact("\x1b[?25l")
        repl.expect(r"\w{3}")  # the answer is being drawn
        repl.sendintr()
        repl.expect(r"tokens/s, cancelled\]")
        repl.expect("you> ")
        repl.sendline("/quit")
        repl.expect(pexpect.EOF)
    finally:
        repl.close(force=True)


def one_shot_text(server, *args) -> str:
    result = run_llm("--prompt", "Tell me about rivers", "--port", str(server.port), "--host", "127.0.0.1",
                     "--max-tokens", "12", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_one_shot_options_reach_the_server(tiny_server):
    """--top-k, --top-p and --system change what the server does; --session takes up a session."""
    greedy = one_shot_text(tiny_server, "--temperature", "0")
    sampled = {one_shot_text(tiny_server, "--temperature", "5") for _ in range(3)}
    assert sampled != {greedy}  # hot sampling wanders off the greedy text
    assert one_shot_text(tiny_server, "--temperature", "5", "--top-k", "1") == greedy  # only the best token left
    assert one_shot_text(tiny_server, "--temperature", "5", "--top-p", "0.000001") == greedy
    with_system = one_shot_text(tiny_server, "--temperature", "0", "--system", "You answer in verse.")
    assert with_system == reference(tiny_server, "Tell me about rivers", system="You answer in verse.") + "\n"
    assert with_system != greedy
    first = run_llm("--prompt", "hi", "--port", str(tiny_server.port), "--host", "127.0.0.1", "--json",
                    "--max-tokens", "2")
    session = json.loads(first.stdout.splitlines()[0])["session_id"]
    again = run_llm("--prompt", "hi", "--port", str(tiny_server.port), "--host", "127.0.0.1", "--json",
                    "--max-tokens", "2", "--session", session)
    welcome = json.loads(again.stdout.splitlines()[0])
    assert welcome["session_id"] == session and welcome["resumed"] is True


def reference(server, prompt, **options) -> str:
    async def answer():
        async with LLMWSEnhancedClient("127.0.0.1", server.port) as client:
            return await client.inference(prompt, temperature=0, max_new_tokens=12, **options)
    return asyncio.run(answer())


async def test_the_client_retries_six_times_with_growing_waits_then_gives_up(start_server, tiny_model):
    server = start_server(tiny_model)
    statuses = []
    client = LLMWSEnhancedClient("127.0.0.1", server.port, on_status=statuses.append)
    await client.connect()
    server.stop()  # the server is gone for good: every try fails
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionError):
        await client.inference("hello", max_new_tokens=4)
    # It gives up after its tries (about 11 s of waits, at most 16), not after waiting out a 60 s timeout
    assert asyncio.get_running_loop().time() - started < 45
    waits = [float(re.search(r"reconnecting in ([\d.]+) s", text).group(1)) for text in statuses
             if text.startswith("connection lost")]
    assert len(waits) == 6 and "reconnected" not in statuses
    assert waits[-1] > waits[0]  # backoff: 0.2 s doubling to at most 5 s, with +-50 % jitter
    assert all(0.1 <= wait <= 7.5 for wait in waits)
    with pytest.raises(ConnectionError):  # and a call after that fails at once
        await asyncio.wait_for(client.ack(), 5)


def ask_repl(repl, question: str) -> str:
    """Ask in a --plain REPL; the answer's text exactly as printed (the terminal writes \n as \r\n)."""
    repl.sendline(question)
    repl.expect_exact(question + "\r\n")  # the terminal's echo of the line
    repl.expect(r"\r\n\[\d+ tokens, ")
    text = repl.before
    repl.expect("you> ")
    return text.replace("\r\n", "\n")


def test_the_repl_keeps_the_conversation_and_clear_starts_over(tiny_server, tmp_path):
    """Each question goes with the turns before it, and /clear drops them: the REPL's greedy answers equal
    the Python client's to the same message lists, and the references show the turns change the answer."""
    repl = spawn_repl(tiny_server, tmp_path, "--plain", "--temperature", "0", "--max-tokens", "12")
    try:
        first = ask_repl(repl, "Tell me about rivers")
        second = ask_repl(repl, "And lakes?")
        repl.sendline("/clear")
        repl.expect("new conversation")
        repl.expect("you> ")
        third = ask_repl(repl, "And lakes?")
    finally:
        repl.close(force=True)
    rivers = {"role": "user", "content": "Tell me about rivers"}
    lakes = {"role": "user", "content": "And lakes?"}
    assert first == reference(tiny_server, None, messages=[rivers])
    with_history = reference(tiny_server, None, messages=[rivers, {"role": "assistant", "content": first}, lakes])
    alone = reference(tiny_server, None, messages=[lakes])
    assert with_history != alone  # the earlier turns change the answer, so the comparisons below tell them apart
    assert second == with_history
    assert third == alone
