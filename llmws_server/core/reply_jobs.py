"""Jobs whose result is one reply, not a stream: embeddings (the inputs checked, the engine's vectors) and
a prompt's token count.

Such a job waits in the same fair queue as a generation, in its client's lane, but takes no slot of the
batch: it runs on the worker thread beside the requests generating (the engine takes its turn on the
model), so a batch of long answers does not hold it up. Its result goes to the one who asked (a future),
not into a session's stream: there is nothing to resume."""
import asyncio
import uuid
from asyncio import AbstractEventLoop
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmws_server.core import events as ev
from llmws_server.core.images import decoded
from llmws_server.core.jobs import Job
from llmws_server.core.requests import InferenceRequest
from llmws_server.core.tools import rendered
from llmws_server.errors import LLMWSError, Refused
from llmws_server.sessions.store import Session, StreamSession

if TYPE_CHECKING:
    from llmws_server.core.worker import Worker
    from llmws_server.engines.api import Engine

Inputs = list[str] | list[list[int]]  # texts, or token ids


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]  # one per input, in order
    tokens: int  # the inputs' tokens, all together


class JobFailed(LLMWSError):
    """The engine could not do it (a bug or the machine's fault, not the client's): the log has why."""


def checked_inputs(value: object, most: int, field: str = "input") -> Inputs:
    """A string, a list of strings, a list of token ids or a list of such lists, as a list of inputs; at
    least one and at most `most` (limits.max_embedding_inputs), none empty."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token(item) for item in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Refused(f"{field} must be a string, a list of strings or a list of token id lists", field)
    if len(value) > most:
        raise Refused(f"{field} has {len(value)} inputs; at most {most} per request (limits.max_embedding_inputs)",
                      field, max_embedding_inputs=most)
    texts = all(isinstance(item, str) for item in value)
    ids = all(isinstance(item, list) and all(_is_token(token) for token in item) for item in value)
    if not (texts or ids):
        raise Refused(f"{field} must be all strings or all token id lists, not a mix", field)
    if any(not item for item in value):
        raise Refused(f"{field}: an input is empty", field)
    return value


def _is_token(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


class ReplyJob(Job):
    """A short job on the worker thread whose result (or refusal) is set on `result`."""

    runs_beside_batch = True

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop):
        super().__init__(session, loop)
        self.request_id = f"{type(self).__name__}-{uuid.uuid4()}"
        self.result: asyncio.Future = loop.create_future()

    def batchable(self, engine: "Engine") -> bool:
        return True  # it never joins the batch: the batching worker runs it beside (runs_beside_batch)

    def emit(self, event: ev.Event) -> None:
        """Queue positions are not told (the reply comes whole); a failure is the reply."""
        if isinstance(event, ev.Failed):
            self.settle(exception=JobFailed(event.message))

    def run(self, worker: "Worker") -> None:
        try:
            answer = self.answer(worker.engine)
        except Refused as exc:  # what the client asked proved impossible (an input over the context)
            self.settle(exception=exc)
            return
        self.settle(answer)

    def answer(self, engine: "Engine") -> object:
        raise NotImplementedError

    def settle(self, answer: object = None, exception: Exception | None = None) -> None:
        def settle() -> None:
            if self.result.done():
                return
            if exception is not None:
                self.result.set_exception(exception)
            else:
                self.result.set_result(answer)
        self.loop.call_soon_threadsafe(settle)


class EmbedJob(ReplyJob):
    failure = "Embedding"

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, inputs: Inputs):
        super().__init__(session, loop)
        self.inputs = inputs

    def answer(self, engine: "Engine") -> Embedded:
        return Embedded(*engine.embed(self.inputs))


class CountJob(ReplyJob):
    """A conversation's prompt tokens, as the request would be read (chat template, tools and images)."""
    failure = "Counting"

    def __init__(self, session: Session | StreamSession, loop: AbstractEventLoop, request: InferenceRequest):
        super().__init__(session, loop)
        self.request = request

    def answer(self, engine: "Engine") -> int:
        if self.request.raw_text is not None:
            return len(engine.encode_text(self.request.raw_text).ids)
        turns, tools = rendered(decoded(self.request.turns), self.request.tools, engine.chat_template)
        return len(engine.encode(turns, tools).ids)
