"""core/batching.py's order of admission, against a scripted engine (engines.api's interface)."""
from llmws_server.config import DEFAULTS
from llmws_server.core import events
from llmws_server.core.batching import BatchingWorker
from llmws_server.core.jobs import InferenceJob, Job
from llmws_server.ws import protocol

from .scripted import Recorder, ScriptedEngine

DEFAULT_SETTINGS = DEFAULTS["generation_defaults"]


def job(session, loop, number, max_tokens=3, **settings):
    message = {"type": "inference", "prompt": str(number), "request_id": f"r{number}",
               "config": {"repetition_penalty": 1.0, "temperature": 0, "max_new_tokens": max_tokens, **settings}}
    return InferenceJob(session, loop, protocol.inference_request(message, DEFAULT_SETTINGS), 60)


class AloneJob(Job):
    """A job that is not a request (as a model switch): it runs alone, and says so in the log."""

    def __init__(self, session, loop, engine, number):
        super().__init__(session, loop)
        self.engine, self.number = engine, number

    def run(self, worker):
        self.engine.events.append(("alone", self.number))
        self.emit(events.done(0, events.FinishReason.STOP, 0.0))


def test_the_batch_admits_in_order_and_nothing_passes_a_job_that_waits(event_loop_thread):
    """1-3 share the open batch whatever their settings (greedy, sampled, penalised); 4 must run alone,
    so it waits for them to drain, and 5 may not pass it; after 4, 5 and 6 share a batch again."""
    loop, engine = event_loop_thread, ScriptedEngine()
    session = Recorder(6)
    worker = BatchingWorker(engine, 4)
    jobs = [job(session, loop, 1), job(session, loop, 2, max_tokens=5, temperature=0.7),
            job(session, loop, 3, repetition_penalty=1.2), AloneJob(session, loop, engine, 4),
            job(session, loop, 5), job(session, loop, 6, temperature=0.7, repetition_penalty=1.1)]
    for each in jobs:  # queued before the worker starts: all of them are there at its first look
        worker.submit(each)
    worker.start(loop)
    assert session.all_done.wait(10)
    worker.stop()
    assert engine.events == [("open", 4), ("add", 1, "greedy"), ("add", 2, "sampled"),
                             ("add", 3, "greedy penalised"), ("end", 1), ("end", 3), ("end", 2), ("close",),
                             ("alone", 4), ("open", 4), ("add", 5, "greedy"), ("add", 6, "sampled penalised"),
                             ("end", 5), ("end", 6), ("close",)]
    done = [m for m in session.messages if m["type"] == "done"]
    assert sorted(m.get("request_id") or "alone" for m in done) == ["alone", "r1", "r2", "r3", "r5", "r6"]
    assert {m["request_id"]: m["total_tokens"] for m in done if m.get("request_id")} == {
        "r1": 3, "r2": 5, "r3": 3, "r5": 3, "r6": 3}
