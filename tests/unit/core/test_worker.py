"""core/worker.py, the one-at-a-time worker, against a scripted engine: its stop."""
import threading
import time
from pathlib import Path

from llmws_server.core import events
from llmws_server.core.jobs import SwitchJob
from llmws_server.core.worker import Worker

from .scripted import Recorder, ScriptedEngine


def test_stopping_during_a_model_switch_ends_cleanly(event_loop_thread):
    """The worker cancels whatever job runs at shutdown, a model switch included."""
    loop, engine, loading = event_loop_thread, ScriptedEngine(), threading.Event()
    engine.unload = lambda: None

    def slow_load(path):
        loading.set()
        time.sleep(0.5)
        return engine

    session = Recorder(1)
    worker = Worker(engine)
    worker.start(loop)
    worker.submit(SwitchJob(session, loop, Path("other"), slow_load, lambda new: events.ModelLoaded(new.name, {}),
                            lambda new, failure: None))
    assert loading.wait(5)
    worker.stop()
    assert not worker.thread.is_alive()
