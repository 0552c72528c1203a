"""The WebSocket side: one handler per connection, and a method per message type.

A message's path: handler -> dispatch -> on_<type> -> (inference) worker FIFO -> worker thread ->
job.emit -> Session.emit (seq, buffer) -> Connection.send -> the socket.
"""
import asyncio
import logging
import socket
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from . import catalog, protocol, resources
from .batching import BatchingWorker
from .config import generation_defaults
from .connection import MESSAGES_PER_SECOND, Connection, remote_address
from .downloads import Downloads
from .handshake import Handshake
from .images import decode_images
from .jobs import InferenceJob
from .metrics import Metrics
from .model_messages import ModelMessages
from .protocol import (ADMIN_TYPES, Busy, ProtocolError, check_message, error, images_of, inference_request, is_hello,
                       parse_frame, parse_hello, settings_update)
from .sessions import SessionsFull, SessionStore
from .worker import Worker

log = logging.getLogger("llmws.server")
SEND_BUFFER_BYTES = 64 * 1024  # the kernel's share of a client's unread output: token streams need little
SESSION_IDLE_S = 24 * 3600  # a session nobody takes up for a day is forgotten, buffer and all
HOUSEKEEPING_S = 10  # how often idle sessions and the queued requests of long-gone clients are looked at
PROMPT_CHARS_PER_TOKEN = 8  # a prompt longer than this many characters per context token is refused unread


class LLMWSServer(ModelMessages):
    def __init__(self, config, engine):
        self.config = config
        self.limits = config.limits
        # For the model loaded now; the sessions and the HTTP API read it, a switch updates it in place
        self.generation_defaults = generation_defaults(config, engine.path)
        self.sessions = SessionStore(config.paths["sessions_dir"], self.generation_defaults,
                                     self.limits["max_sessions"])
        batch = config.optimization["max_batch_size"]
        if batch == "auto":
            batch = engine.batch_size()
            log.info("batching up to %d requests at once (optimization.max_batch_size \"auto\" on %s)",
                     batch, engine.device)
        self.worker = BatchingWorker(engine, batch) if batch > 1 else Worker(engine)
        self.metrics = Metrics(self)
        self.loaded_fingerprint = catalog.fingerprint(engine.path)  # what recheck_model compares with
        self.datasets = {}
        self.downloads = Downloads(config)
        self.connections: set[Connection] = set()
        self.handshake = Handshake(config.server)

    @property
    def engine(self):
        return self.worker.engine

    async def housekeeping(self) -> None:
        """Runs for the server's life: cancel what long-gone clients left queued, forget idle sessions."""
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_S, self.limits["detached_queue_timeout_s"] / 2))
            self.cancel_abandoned(time.monotonic())
            gone = self.sessions.expire(SESSION_IDLE_S)
            if gone:
                log.info("forgot %d idle sessions", gone)

    def cancel_abandoned(self, now: float) -> None:
        """Queued requests of a session whose client left more than detached_queue_timeout_s ago are cancelled
        (what runs goes on); the error is buffered, so the client learns of it if it comes back."""
        gone_for = self.limits["detached_queue_timeout_s"]
        for session in list(self.sessions.sessions.values()):
            if session.connection is not None or session.detached_at is None or now - session.detached_at < gone_for:
                continue
            cancelled = [job for job in self.worker.waiting_of(session) if self.worker.remove(job)]
            for job in cancelled:
                session.emit(error(f"Cancelled: its client was gone for more than {gone_for} s",
                                   request_id=job.request_id))
            if cancelled:
                log.info("session %s: cancelled %d queued requests, its client gone for %d s",
                         session.label, len(cancelled), now - session.detached_at)

    def serve(self, host: str, port: int, ssl=None):
        server = self.config.server
        return serve(self.handler, host, port, ssl=ssl, process_request=self.handshake.check,
                     max_size=server["max_message_size"], ping_interval=server["ping_interval"],
                     ping_timeout=server["ping_timeout"])


    async def handler(self, websocket):
        if len(self.connections) >= self.limits["max_clients"]:
            await websocket.close(1013, "Server full: too many clients, try again later")
            return
        address = remote_address(websocket)
        if sum(c.address == address for c in self.connections) >= self.limits["max_clients_per_ip"]:
            await websocket.close(1013, "Too many connections from your address, try again later")
            return
        # A client may leave unread what the kernel holds, plus as much as it may send in one frame.
        sock = websocket.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        connection = Connection(websocket, self.config.server["max_message_size"])
        connection.admin_problem = self.handshake.admin_problem(websocket.request)
        self.connections.add(connection)
        session = None
        try:
            session, pending = await self._open_session(websocket, connection)
            if session is None:
                return
            if pending is not None:
                await self.dispatch(session, connection, pending)
            while (raw := await self._next_frame(websocket, session)) is not None:
                if connection.within_rate():
                    await self.dispatch(session, connection, raw)
                else:
                    session.reply(error(f"Too many messages: at most {MESSAGES_PER_SECOND} a second"))
        except (ConnectionClosed, SessionsFull):
            pass
        finally:
            self.connections.discard(connection)
            if session is not None:
                session.detach(connection)
            await asyncio.sleep(0)  # let the outbox drain what it can before it is dropped
            connection.stop()

    async def _next_frame(self, websocket, session):
        """The next frame; None once the connection has been quiet for idle_timeout_s with nothing running."""
        idle = self.limits["idle_timeout_s"]
        while True:
            try:
                return await asyncio.wait_for(websocket.recv(), idle)
            except asyncio.TimeoutError:
                if not session.jobs:
                    await websocket.close(1000, f"Idle for {idle} s with nothing running: reconnect any time")
                    return None

    async def _open_session(self, websocket, connection):
        """Read the hello and attach the session; return it with a first frame still to handle
        (or None, None when no hello came)."""
        wait = self.limits["hello_timeout_s"]
        try:
            raw = await asyncio.wait_for(websocket.recv(), wait)
        except asyncio.TimeoutError:
            await websocket.close(1008, f"No hello within {wait} s")
            return None, None
        requested, last_seq, pending, problem = None, 0, None, None
        try:
            message = parse_frame(raw)
            if is_hello(message):
                requested, last_seq = parse_hello(message)
            else:
                pending = message  # an implicit empty hello
        except ProtocolError as exc:
            problem = exc
        device = await asyncio.to_thread(resources.device_summary)
        try:
            session, resumed = self.sessions.open(requested)
        except SessionsFull as exc:
            log.warning("refused a connection: %s", exc)
            await websocket.close(1013, "Server full: too many sessions in use, try again later")
            raise
        welcome = protocol.welcome(session.id, resumed, self.engine.name, self.engine.capabilities(), device,
                                   self.train_status())
        session.attach(connection, welcome, last_seq)
        if resumed:
            self.metrics.resumes.inc()
            self.metrics.replayed.inc(max(0, session.seq - last_seq))
        log.info("session %s %s", session.label, "resumed" if resumed else "opened")
        if requested is not None and not resumed:
            session.reply(protocol.log("The session you asked for is not known here: sessions are cleared when "
                                       "the server restarts and forgotten after a day without a client. This "
                                       "is a new session; earlier answers cannot be resumed."))
        if problem:
            session.reply(error(str(problem)))
        return session, pending

    async def dispatch(self, session, connection, raw) -> None:
        try:
            message = raw if isinstance(raw, dict) else parse_frame(raw)
            kind = check_message(message)
            if kind in ADMIN_TYPES and connection.admin_problem:
                raise ProtocolError(f"{kind} needs the admin scope: {connection.admin_problem}")
            await self._act(session, kind, message)
        except ValueError as exc:  # a ProtocolError, or a check elsewhere (catalog, downloads, images) refusing
            session.reply(error(str(exc), **getattr(exc, "fields", {})))

    async def _act(self, session, kind: str, message: dict) -> None:
        """Act on a frame. One with a request_id runs once however often it comes: a client sends it again
        when a cut may have lost it."""
        handle = getattr(self, f"on_{kind}")
        request_id = message.get("request_id") if kind != "cancel" else None
        if not request_id:
            return await handle(session, message)
        fingerprint = protocol.fingerprint(message)
        if session.is_a_retry(request_id, fingerprint):
            log.info("session %s sent request %s again after a cut: it runs once", session.label, request_id)
            return
        previous = session.take(request_id, fingerprint)
        try:
            await handle(session, message)
        except ValueError:
            session.untake(request_id, previous)
            raise

    # -- messages --------------------------------------------------------------------------------

    async def on_inference(self, session, message):
        await self.submit(session, inference_request(message, session.config))

    async def submit(self, session, request) -> InferenceJob:
        """Queue a request for a session (a WebSocket session, or an HTTP request's); ValueError refuses it,
        protocol.Busy when the server or the session has no room now."""
        turns = request.turns
        characters = sum(len(turn["content"]) for turn in turns)
        max_context = self.engine.max_context
        if characters > PROMPT_CHARS_PER_TOKEN * max_context:  # refused untokenized: a lower bound will do
            at_least = characters // PROMPT_CHARS_PER_TOKEN
            raise ProtocolError(f"Context too long (at least {at_least} tokens, estimated from {characters} "
                                f"characters). Max: {max_context}. Please retry with shorter input.",
                                max_context=max_context, input_length=at_least, input_length_estimated=True)
        if self.worker.waiting() >= self.limits["max_queued_requests"]:
            raise Busy(f"Server queue full ({self.limits['max_queued_requests']} requests waiting): try again later")
        most = self.limits["max_session_buffer_mb"] * 1024 ** 2
        if session.buffer_bytes > most:
            raise Busy(f"Session buffer full ({session.buffer_bytes // 1024 ** 2} MB not acknowledged): "
                       "send ack once you have your answers, then retry")
        job = InferenceJob(session, asyncio.get_running_loop(), request, self.limits["timeout_token_generation"])
        job.observer = self.metrics.observe
        session.add_job(job, self.limits["queue_size_per_client"])
        if images_of(turns):
            try:
                await self._decode_images(turns)
            except BaseException:
                session.drop_job(job.request_id)
                raise
        self.worker.submit(job)
        return job

    async def _decode_images(self, turns) -> None:
        """Replace each turn's encoded images with decoded ones (off the event loop), or refuse them all."""
        if not self.engine.vision:
            raise ProtocolError(f"This model does not take images: {self.engine.name}")
        decoded = iter(await asyncio.to_thread(decode_images, images_of(turns), self.limits))
        for turn in turns:
            if "images" in turn:
                turn["images"] = [next(decoded) for _ in turn["images"]]

    async def on_config(self, session, message):
        session.overrides.update(settings_update(message.get("data"), "data"))
        session.reply(protocol.config_ack(session.config))

    async def on_ping(self, session, message):
        session.reply(protocol.pong())

    async def on_ack(self, session, message):
        session.clear_buffer()
        session.reply(protocol.ack_received())

    async def on_cancel(self, session, message):
        request_id = message.get("request_id") or next(iter(session.jobs), None)
        job = session.jobs.get(request_id)
        if job is None:
            raise ProtocolError(f"No request {request_id} to cancel" if request_id else "No request to cancel")
        self.cancel_job(session, job)
        session.reply(protocol.cancelled(request_id))

    def cancel_job(self, session, job) -> None:
        """A queued job leaves the queue; a running one ends at its next token with done, "cancelled"."""
        if self.worker.remove(job):
            session.drop_job(job.request_id)
        else:
            job.cancelled.set()
