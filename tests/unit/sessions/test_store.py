"""sessions/store.py: a request id's frame taken once, and sessions forgotten when left (the clock injected)."""
from llmws_server.core.events import Log, Stamped
from llmws_server.sessions.store import UNUSED_IDLE_S, SessionStore
from llmws_server.ws import wire
from llmws_server.ws.wire import CODEC


def test_a_session_takes_a_request_id_s_frame_once_unless_it_was_refused(tmp_path):
    from llmws_server.sessions.file_buffer import FileBuffer
    from llmws_server.sessions.store import TAKEN_KEPT, Session

    session = Session("s", FileBuffer(tmp_path, "s"), wire.CODEC, {})
    assert not session.is_a_retry("r1", "frame a")
    session.take("r1", "frame a")
    assert session.is_a_retry("r1", "frame a") and not session.is_a_retry("r1", "frame b")
    session.untake("r1", session.take("r1", "frame b"))  # another frame with its id, refused
    assert session.is_a_retry("r1", "frame a")
    session.untake("r2", session.take("r2", "frame c"))  # refused: sent again, it may run
    assert not session.is_a_retry("r2", "frame c")
    for number in range(TAKEN_KEPT):
        session.take(f"later-{number}", "frame")
    assert not session.is_a_retry("r1", "frame a") and len(session.taken) == TAKEN_KEPT  # the oldest forgotten


def test_sessions_that_never_ran_anything_are_forgotten_quickly(tmp_path):
    store = SessionStore(tmp_path, {}, CODEC)
    unused, used = store.open()[0], store.open()[0]
    used.emit(Stamped(Log("x")))
    for session in (unused, used):
        session.detach(None)
        session.detached_at = 0.0
    assert store.expire(idle_s=24 * 3600, now=UNUSED_IDLE_S + 1) == 1
    assert set(store.sessions) == {used.id}


def test_a_session_left_for_a_day_is_forgotten_not_sooner(tmp_path):
    """The server expires sessions with SESSION_IDLE_S, a day: the store's rule, with its clock injected."""
    from llmws_server.core.events import Log, Stamped
    from llmws_server.core.service import SESSION_IDLE_S
    from llmws_server.sessions.store import SessionStore
    from llmws_server.ws.wire import CODEC

    assert SESSION_IDLE_S == 24 * 3600
    store = SessionStore(tmp_path, {}, CODEC)
    session = store.open()[0]
    session.emit(Stamped(Log("x")))
    session.detach(None)
    session.detached_at = 1000.0
    assert store.expire(SESSION_IDLE_S, now=1000.0 + SESSION_IDLE_S - 60) == 0  # a minute short of a day
    assert store.open(session.id) == (session, True) and session.buffer.file.exists()
    assert store.expire(SESSION_IDLE_S, now=1000.0 + SESSION_IDLE_S + 60) == 1
    assert session.id not in store.sessions and not session.buffer.file.exists()


def test_idle_sessions_are_forgotten_with_their_buffers(tmp_path):
    from llmws_server.core.events import Log, Stamped
    from llmws_server.sessions.store import SessionStore
    from llmws_server.ws.wire import CODEC

    store = SessionStore(tmp_path, {}, CODEC)
    left, busy, live = (store.open()[0] for _ in range(3))
    for session in (left, busy, live):
        session.emit(Stamped(Log("x")))
    for session in (left, busy):
        session.detach(None)  # no connection was live: they were left at once
        session.detached_at = 100.0
    busy.jobs["r1"] = object()
    live.connection = object()
    assert store.expire(idle_s=50, now=140.0) == 0  # not idle long enough yet
    assert store.expire(idle_s=50, now=200.0) == 1
    assert set(store.sessions) == {busy.id, live.id} and not left.buffer.file.exists()
    assert store.open(left.id)[1] is False  # a forgotten id gets a fresh session
