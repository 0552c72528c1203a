"""listeners.py without a socket: an event loop error that repeats (accept() out of files) is one line with a count."""
import logging
import time

from llmws_server.listeners import RepeatedLog


def test_an_event_loop_error_that_repeats_is_logged_once_with_a_count(caplog):
    class Loop:
        def __init__(self):
            self.reported: list[str] = []

        def default_exception_handler(self, context):
            self.reported.append(context["message"])

    loop, repeated = Loop(), RepeatedLog(logging.getLogger("test"), window_s=0.5)
    for _ in range(1000):
        repeated.loop_errors(loop, {"message": "socket.accept() out of system resource",  # type: ignore[arg-type]
                                    "exception": OSError(24, "Too many open files")})
    assert loop.reported == ["socket.accept() out of system resource"]
    time.sleep(0.6)
    repeated.loop_errors(loop, {"message": "socket.accept() out of system resource",  # type: ignore[arg-type]
                                "exception": OSError(24, "Too many open files")})
    assert loop.reported[1] == "socket.accept() out of system resource (and 999 more times in the last 0.5 s)"
