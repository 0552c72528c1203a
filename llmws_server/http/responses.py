"""The Responses API's endpoints: a stored response is a session, so it can be read again, whole or as
its stream from any event on (`starting_after`), while it runs and after, with no gap and no duplicate.

    POST /v1/responses                   stream, background, store
    GET  /v1/responses/{id}              the response as it stands; ?stream=true&starting_after=N its events
    POST /v1/responses/{id}/cancel
"""
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmws_server.core.events import Event, FinishReason, Stamped, done
from llmws_server.core.jobs import InferenceJob
from llmws_server.errors import SessionsFull
from llmws_server.http import runs
from llmws_server.http.errors import APIError
from llmws_server.http.responses_state import (
    ResponsesRequest,
    ResponseState,
    response_id,
    responses_request,
    session_id_of,
)
from llmws_server.http.streams import sse
from llmws_server.sessions.store import CLIENT_LANE, Session, StreamSession

if TYPE_CHECKING:
    from llmws_server.http.app import HTTPApi

log = logging.getLogger("llmws.http")


class Feed:
    """A stored response's live readers (sessions.store.Listener), standing where a WebSocket session has
    its connection (so the session is not idle, nor its queued request abandoned, while the response
    runs); it lets go of the session when the response ends."""

    def __init__(self, session: Session):
        self.session = session
        self.readers: set[asyncio.Queue[Stamped]] = set()

    def listen(self) -> "asyncio.Queue[Stamped]":
        reader: asyncio.Queue[Stamped] = asyncio.Queue()
        self.readers.add(reader)
        return reader

    def deliver(self, stamped: Stamped, record: dict) -> None:
        for reader in self.readers:
            reader.put_nowait(stamped)
        if stamped.terminal and stamped.request_id is not None:
            self.session.detach(self)

    def notify(self, event: Event) -> None:
        """Nothing to tell readers that the buffer cannot be written: they read what is delivered."""

    def taken_over(self) -> None:
        """A WebSocket client took the session over: the readers get nothing more."""
        self.readers.clear()


def routes(api: "HTTPApi") -> list[Route]:
    endpoints = ResponsesEndpoints(api)
    return [Route("/v1/responses", api.endpoint(endpoints.create), methods=["POST"]),
            Route("/v1/responses/{response_id}", api.endpoint(endpoints.retrieve)),
            Route("/v1/responses/{response_id}/cancel", api.endpoint(endpoints.cancel), methods=["POST"])]


class ResponsesEndpoints:
    def __init__(self, api: "HTTPApi"):
        self.api, self.service = api, api.service

    async def create(self, request: Request) -> Response:
        server = self.service
        wanted = responses_request(await self.api.body(request), server.generation_defaults)
        if not wanted.store:  # a plain request, told as events
            return await self._answer_unstored(request, wanted)
        try:
            session, _ = server.sessions.open()
        except SessionsFull as exc:
            raise APIError(f"Server full: {exc}", status=429, kind="rate_limit_error") from None
        session.lane = CLIENT_LANE.get()  # its request waits in its client's lane
        session.attach(Feed(session))
        session.response = ResponseState(session.id, server.engine.name, time.time(), wanted.background,
                                         wanted.settings)
        try:
            job = await server.submit(session, wanted.inference)
        except BaseException:
            server.sessions.forget(session)
            raise
        if wanted.background and not wanted.stream:
            return JSONResponse(session.response.object())
        if wanted.stream:
            return sse(_server_events(self.events(session, -1, job if not wanted.background else None)))
        # Not background: a client that hangs up before the whole response cancels it, as a stream's does
        return JSONResponse(await runs.until_disconnect(request, _whole(self.events(session, -1, job))))

    async def _answer_unstored(self, request: Request, wanted: ResponsesRequest) -> Response:
        """store: false: the request runs as a chat completion would, told as events, with nothing kept."""
        session = StreamSession()
        job = await self.service.submit(session, wanted.inference)
        state = ResponseState(str(uuid.uuid4()), self.service.engine.name, time.time(), False, wanted.settings)
        events = self._unstored_events(session, job, state)
        if wanted.stream:
            return sse(_server_events(events))
        return JSONResponse(await runs.until_disconnect(request, _whole(events)))

    async def _unstored_events(self, session: StreamSession, job: InferenceJob,
                               state: ResponseState) -> AsyncIterator[dict]:
        ended = False
        try:
            for event in state.opening():
                yield event
            while not state.ended:
                for event in state.fold((await session.events.get()).event):
                    yield event
            ended = True
        finally:
            if not ended:
                self.service.cancel(session, job)

    async def retrieve(self, request: Request) -> Response:
        session = self._session(request.path_params["response_id"])
        query = request.query_params
        if query.get("stream", "false").lower() != "true":
            return JSONResponse(self.replayed(session).object())
        try:
            after = int(query.get("starting_after", "-1"))
        except ValueError:
            raise APIError("starting_after must be a whole number", "starting_after") from None
        return sse(_server_events(self.events(session, after, None)))

    async def cancel(self, request: Request) -> Response:
        session = self._session(request.path_params["response_id"])
        for job in list(session.jobs.values()):
            self.service.cancel(session, job)
            if job.request_id in session.jobs:  # it ends at its next token, with done "cancelled"
                continue
            session.emit(Stamped(done(0, FinishReason.CANCELLED, 0), job.request_id))  # it never started
        return JSONResponse(await _whole(self.events(session, -1, None)))

    def _session(self, given: str) -> Session:
        session_id = session_id_of(given)
        session = self.service.sessions.sessions.get(session_id) if session_id else None
        if session is None or not isinstance(session.response, ResponseState):
            raise APIError(f"No response found with id '{given[:64]}' (responses are kept for a day, and "
                           "not over a restart)", "response_id", status=404, kind="not_found_error")
        return session

    @staticmethod
    def fresh_state(session: Session) -> ResponseState:
        info = session.response
        return ResponseState(session.id, info.model, info.created_at, info.background, info.settings)

    def replayed(self, session: Session) -> ResponseState:
        """The response as its buffer tells it so far."""
        state = self.fresh_state(session)
        state.opening()
        for stamped in session.buffered(0, session.seq):
            state.fold(stamped.event)
        return state

    async def events(self, session: Session, after: int, job: InferenceJob | None,
                     state: ResponseState | None = None) -> AsyncIterator[dict]:
        """The response's events numbered above `after`: those its buffer holds, then, while it runs, the
        new ones as they come. A reader subscribes before reading the buffer, and skips what the buffer
        gave: nothing falls between. With `job`, a reader who leaves cancels it."""
        state, ended = state or self.fresh_state(session), False
        feed = session.connection if isinstance(session.connection, Feed) else None
        reader, upto = (feed.listen() if feed else None), session.seq
        try:
            for event in state.opening():
                if event["sequence_number"] > after:
                    yield event
            for stamped in session.buffered(0, upto):
                for event in state.fold(stamped.event):
                    if event["sequence_number"] > after:
                        yield event
            while reader is not None and not state.ended:
                stamped = await reader.get()
                if (stamped.seq or 0) > upto:
                    for event in state.fold(stamped.event):
                        if event["sequence_number"] > after:
                            yield event
            ended = True
        finally:
            if feed is not None:
                feed.readers.discard(reader)
            if job is not None and not ended:
                log.info("response %s cancelled: its HTTP client left", response_id(session.id)[:13])
                self.service.cancel(session, job)


async def _server_events(events: AsyncIterator[dict]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        yield ServerSentEvent(data=json.dumps(event, ensure_ascii=False), event=event["type"])


async def _whole(events: AsyncIterator[dict]) -> dict | None:
    """The response object as the last of `events` that carries one tells it (the final one, at the end)."""
    response = None
    async for event in events:
        response = event.get("response", response)
    return response
