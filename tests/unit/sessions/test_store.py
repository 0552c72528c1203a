"""sessions/store.py: a request id's frame taken once, and sessions forgotten when left (the clock injected)."""
from llmws_server.ws import wire


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
