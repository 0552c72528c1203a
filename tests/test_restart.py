"""Issue #41: sessions survive a restart when server.keep_sessions_over_restart is set. A client that comes
back after the server was killed (-9) or stopped cleanly gets every message it was sent, byte for byte,
and a request that was running ends with an error saying the server stopped, never with silence. Off (the
default, as the seed), a restart forgets every session. Real servers on one project folder, tiny model."""
import signal

import pytest
from conftest import Client, ServerProcess, inference, text_of

KEEP = {"server": {"keep_sessions_over_restart": True}}


@pytest.fixture()
def servers(tmp_path, tiny_model):
    """start(overrides) -> a server on one project folder (the one before it is stopped by the test)."""
    started: list[ServerProcess] = []

    def start(overrides: dict) -> ServerProcess:
        started.append(ServerProcess(tmp_path, tiny_model, overrides))
        return started[-1]

    yield start
    for server in started:
        server.stop()


async def finished_and_cut(server: ServerProcess) -> tuple[Client, list[dict]]:
    """A session with one finished answer and one long request that has begun: what the client got so far."""
    client = await Client.open(server.url)
    seen = await client.until_done(inference("Hello", max_new_tokens=8, request_id="finished"))
    await client.send(inference("Tell me a long story", max_new_tokens=4000, request_id="cut"))
    seen += await client.until("token")
    return client, seen


@pytest.mark.parametrize("stop", ["kill -9", "clean stop"])
async def test_a_kept_session_is_taken_up_after_a_restart_and_the_cut_request_says_so(servers, stop):
    first = servers(KEEP)
    client, seen = await finished_and_cut(first)
    first.process.send_signal(signal.SIGKILL if stop == "kill -9" else signal.SIGTERM)
    first.process.wait(30)
    second = servers(KEEP)
    again = await Client.open(second.url, {"session_id": client.session_id, "last_seq": 0})
    assert again.welcome["resumed"] is True
    replayed = await again.until("error", timeout=30)  # the replay comes at once
    assert replayed[:len(seen)] == seen  # what it got before, byte for byte, from seq 1
    assert [message["seq"] for message in replayed] == list(range(1, len(replayed) + 1))
    answer = text_of([m for m in seen if m.get("request_id") == "finished"])
    cut = replayed[-1]
    assert cut["request_id"] == "cut" and "server stopped before this request ended" in cut["message"]
    assert not any(m["type"] == "done" and m.get("request_id") == "cut" for m in replayed)
    later = await again.until_done(inference("Hello", max_new_tokens=8, request_id="after"))
    assert later[0]["seq"] == cut["seq"] + 1 and text_of(later) == answer  # the session goes on
    await again.close()


async def test_a_client_back_after_a_restart_gets_only_what_it_had_not_seen(servers):
    first = servers(KEEP)
    client, seen = await finished_and_cut(first)
    first.process.kill()
    first.process.wait(30)
    second = servers(KEEP)
    again = await Client.open(second.url, {"session_id": client.session_id, "last_seq": seen[-1]["seq"]})
    assert again.welcome["resumed"] is True
    rest = await again.until("error", timeout=30)
    assert rest[0]["seq"] == seen[-1]["seq"] + 1 and rest[-1]["request_id"] == "cut"
    await again.close()


async def test_without_the_setting_a_restart_forgets_every_session(servers):
    first = servers({})
    client = await Client.open(first.url)
    await client.until_done(inference("Hello", max_new_tokens=4))
    first.stop()
    second = servers({})
    again = await Client.open(second.url, {"session_id": client.session_id, "last_seq": 0})
    assert again.welcome["resumed"] is False and again.welcome["session_id"] != client.session_id
    assert not (second.sessions_dir / client.session_id).exists()
    await again.close()
