"""What every HTTP dialect does with a request the same way: its choices submitted to the core (each a
StreamSession of its own, decoding together), refused with a status while nothing has started, and their
events told in a dialect-neutral order, with stop strings cut and the rest cancelled when the client leaves.
Each API module (openai.py, anthropic.py, ollama.py) only shapes what it is told."""
import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import TypeVar, Union

from starlette.requests import Request

from llmws_server.core.events import (
    Done,
    Failed,
    FinishReason,
    Queued,
    Reasoning,
    Stamped,
    Started,
    Text,
    ToolCallArguments,
    ToolCallStarted,
)
from llmws_server.core.jobs import InferenceJob
from llmws_server.core.requests import InferenceRequest
from llmws_server.core.service import Service
from llmws_server.http.errors import APIError
from llmws_server.sessions.store import StreamSession

log = logging.getLogger("llmws.http")
T = TypeVar("T")
QUEUE_HEADER = "x-llmws-queue-position"  # requests ahead when this one had to wait


@dataclass(frozen=True)
class Finished:
    """The end of a choice: a stop string's cut is a stop, and `stop` names the string (None when the model or
    a limit ended it); the token counts are the engine's (at a cut, the tokens generated until it stopped)."""
    reason: FinishReason
    tokens_in: int
    tokens_out: int
    stop: str | None = None


Told = Union[Queued, Started, Text, Reasoning, ToolCallStarted, ToolCallArguments, Finished, Failed]  # in order
Stream = AsyncGenerator[Told, None]  # one choice's; closing it early cancels the choice


def refusal(failed: Failed) -> APIError:
    """A job's failure as an API error: too long a prompt is the client's (400), a place given up in the full
    queue is for now (429), the rest the server's (500)."""
    if "max_context" in failed.fields:
        return APIError(failed.message, "messages", **failed.fields)
    if "max_queued_requests" in failed.fields:  # its place went to another client's request: retry later
        return APIError(failed.message, status=429, kind="rate_limit_error", **failed.fields)
    return APIError(failed.message, status=500, kind="server_error")


class StopText:
    """Text as it streams, cut at the first stop string: the one that is complete first (the text after it
    would never be generated), the longer one where two end together; so the cut is the same however the
    text is split into pieces. What could be the start of a stop string is held back until the next piece
    shows it is not."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""
        self.stop: str | None = None  # the stop string the text was cut at

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def feed(self, text: str) -> str:
        """The part of the text so far that may be sent now."""
        self.held += text
        found = [(index + len(stop), index, stop) for stop in self.stops if (index := self.held.find(stop)) >= 0]
        if found:
            _, at, self.stop = min(found)
            ready, self.held = self.held[:at], ""
            return ready
        keep = max((size for stop in self.stops for size in range(1, len(stop))
                    if self.held.endswith(stop[:size])), default=0)
        ready, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return ready

    def rest(self) -> str:
        """At the end: what was held back (no stop string came)."""
        rest, self.held = self.held, ""
        return rest


@dataclass
class Runs:
    """The choices of one request, queued or started, each told as a stream of Told."""
    streams: list[AsyncIterator[Told]]  # each a Stream (openai.py takes them as this list)
    position: int | None  # requests ahead of the first choice when it had to wait

    @property
    def headers(self) -> dict[str, str]:
        return {QUEUE_HEADER: str(self.position)} if self.position is not None else {}


async def prompt_tokens(service: Service, inference: InferenceRequest) -> int:
    """The prompt's tokens as the model reads it (counted on copies of the turns: counting decodes their
    images in place)."""
    return await service.count_tokens(replace(inference, turns=[dict(turn) for turn in inference.turns]))


async def start(service: Service, inferences: list[InferenceRequest], stops: tuple[str, ...] = ()) -> Runs:
    """Queue a job per choice; a choice refused before it started is the whole request's refusal (raised)."""
    runs: list[tuple[InferenceJob, StreamSession]] = []
    try:
        for inference in inferences:
            session = StreamSession()
            runs.append((await service.submit(session, inference), session))
        firsts = [await session.events.get() for _, session in runs]
    except BaseException:
        for job, session in runs:
            service.cancel(session, job)
        raise
    failed = next((first.event for first in firsts if isinstance(first.event, Failed)), None)
    if failed is not None:
        for job, session in runs:
            service.cancel(session, job)
        raise refusal(failed)
    first = firsts[0].event
    return Runs([told(service, job, session, stamped, stops) for (job, session), stamped in zip(runs, firsts)],
                first.position if isinstance(first, Queued) else None)


async def told(service: Service, job: InferenceJob, session: StreamSession, stamped: Stamped,
               stops: tuple[str, ...]) -> Stream:
    """A choice's events: queue positions, its start, text, reasoning and tool calls, then finished or failed. A stop
    string ends the text there and cancels the rest; a client that leaves (the stream closed early) cancels
    it all."""
    stop, tokens_in, finished = StopText(stops), 0, False
    try:
        while True:
            event = stamped.event
            if isinstance(event, Started):
                tokens_in = event.tokens_in
                yield event
            elif isinstance(event, Text):
                if not stop.stopped:
                    text = stop.feed(event.text)
                    if stop.stopped:
                        job.cancelled.set()
                    if text or event.logprobs:
                        yield Text(text, event.logprobs)
            elif isinstance(event, Done):
                finished = True
                rest = stop.rest()
                if rest:
                    yield Text(rest)
                yield Finished(FinishReason.STOP if stop.stopped else event.reason, tokens_in, event.tokens, stop.stop)
                return
            elif isinstance(event, (Queued, Reasoning, ToolCallStarted, ToolCallArguments, Failed)):
                finished = isinstance(event, Failed)
                yield event
                if finished:
                    return
            stamped = await session.events.get()
    finally:
        if not finished:
            log.info("request %s cancelled: its HTTP client left", job.request_id)
            service.cancel(session, job)


async def merged(streams: list[AsyncIterator[Told]]) -> AsyncGenerator[tuple[int, Told], None]:
    """(choice index, what it told), from every choice as it comes; one stream alone goes straight."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Told | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Told]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            await queue.put((index, None))

    pumps = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, got = await queue.get()
            if got is None:
                running -= 1
            else:
                yield index, got
    finally:
        for task in pumps:
            task.cancel()


class ClientLeft(APIError):
    """The client hung up before its whole answer was ready: what is sent now reaches nobody."""

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was whole", status=499,
                         kind="client_closed_request")


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """What `awaitable` gives, unless the client hangs up first: then it is cancelled, so the streams it
    reads run their cancel paths (their jobs end), and ClientLeft is raised. Every answer that is collected
    whole before it is sent goes through here, after the body was read: a client that leaves cancels its
    request whether it streams or not."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled() and work.done():
        return work.result()
    try:
        await work  # its cancel paths run now
    except asyncio.CancelledError:
        pass
    raise ClientLeft()


async def _disconnected(request: Request) -> None:
    """Returns once the ASGI server says the client is gone (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
