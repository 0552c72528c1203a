"""The WebSocket front end: one handler per connection, and a method per message type. It turns frames
into the core's requests and the core's events into the seed protocol's messages (ws/wire.py).

A message's path: handler -> dispatch -> on_<type> -> Service.submit -> the worker FIFO -> the worker
thread -> job.emit -> Session.emit (seq, buffer) -> Connection.deliver -> the socket.
"""
import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from ssl import SSLContext

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from llmws_server import resources
from llmws_server.core.requests import parse_json, settings_update
from llmws_server.core.service import Service
from llmws_server.core.training import train_request
from llmws_server.errors import Busy, LLMWSError, Refused, SessionsFull
from llmws_server.listeners import ConnectionPolicy, guarded_websocket
from llmws_server.sessions.store import Session
from llmws_server.ws import protocol
from llmws_server.ws.connection import MESSAGES_PER_SECOND, Connection, remote_address
from llmws_server.ws.handshake import Handshake
from llmws_server.ws.protocol import ADMIN_TYPES, check_message, error, inference_request, is_hello, parse_hello

log = logging.getLogger("llmws.server")
MAX_EMBEDDINGS_IN_FLIGHT = 8  # embed requests of one connection waiting for their vectors
REPLIED_AGAIN = {"cancel", "embed"}  # sent again with its request_id, it is answered again (nothing buffered)
ROOM_MADE = 4001  # the close code of an idle connection closed to let a newcomer in when the server is full
SEND_BUFFER_BYTES = 64 * 1024  # the kernel's share of a client's unread output: token streams need little

Handler = Callable[[Session, Connection, dict], Awaitable[None]]


class WebSocketServer:
    def __init__(self, service: Service):
        self.service = service
        self.server_settings = service.config.server
        self.limits = service.config.limits
        self.connections: set[Connection] = set()
        self.handshake = Handshake(self.server_settings)
        service.metrics.connections = lambda: len(self.connections)

    def serve(self, host: str, port: int, ssl: SSLContext | None = None,
              policy: ConnectionPolicy | None = None) -> Awaitable[Server]:
        """Listen; with `policy`, connections are counted and capped at accept (llmws_server/listeners.py)."""
        server = self.server_settings
        return serve(self.handler, host, port, ssl=ssl, process_request=self.handshake.check,
                     max_size=server["max_message_size"], ping_interval=server["ping_interval"],
                     ping_timeout=server["ping_timeout"], open_timeout=self.limits["hello_timeout_s"],
                     create_connection=guarded_websocket(policy) if policy else None)

    async def close_all(self) -> None:
        for connection in list(self.connections):
            await connection.websocket.close(1001, "Server shutting down")

    async def handler(self, websocket: ServerConnection) -> None:
        if len(self.connections) >= self.limits["max_clients"] and not self._make_room():
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
        connection = Connection(websocket, self.server_settings["max_message_size"])
        assert websocket.request is not None  # the handler runs after the handshake
        connection.admin_problem = self.handshake.admin_problem(websocket.request, address)
        self.connections.add(connection)
        session = None
        try:
            session, pending = await self._open_session(websocket, connection)
            if session is None:
                return
            connection.session = session
            if pending is not None:
                await self.dispatch(session, connection, pending)
            while (raw := await self._next_frame(websocket, session)) is not None:
                if connection.within_rate():
                    await self.dispatch(session, connection, raw)
                else:
                    connection.send(error(f"Too many messages: at most {MESSAGES_PER_SECOND} a second"))
        except (ConnectionClosed, SessionsFull):
            pass
        finally:
            self.connections.discard(connection)
            if session is not None:
                session.detach(connection)
            await asyncio.sleep(0)  # let the outbox drain what it can before it is dropped
            connection.stop()

    def _make_room(self) -> bool:
        """With max_clients connections open, close the one idle longest with nothing queued or running (its
        session resumes any time) to let a newcomer in; False when every one is busy. So only clients with
        work can fill the server."""
        now = time.monotonic()
        idle = [(idle_for, connection) for connection in self.connections
                if (idle_for := connection.idle_for(now)) is not None]
        if not idle:
            return False
        idle_for, idlest = max(idle, key=lambda pair: pair[0])
        self.connections.discard(idlest)
        idlest.close(ROOM_MADE, "Server full: closed as the longest idle, to let a client in; resume any time")
        log.info("closed a connection idle for %.0f s with nothing to run, to let a newcomer in", idle_for)
        return True

    async def _next_frame(self, websocket: ServerConnection, session: Session) -> str | bytes | None:
        """The next frame; None once the connection has been quiet for idle_timeout_s with nothing running."""
        idle = self.limits["idle_timeout_s"]
        while True:
            try:
                return await asyncio.wait_for(websocket.recv(), idle)
            except asyncio.TimeoutError:
                if not session.jobs:
                    await websocket.close(1000, f"Idle for {idle} s with nothing running: reconnect any time")
                    return None

    async def _open_session(self, websocket: ServerConnection,
                            connection: Connection) -> tuple[Session | None, dict | None]:
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
            message = parse_json(raw)
            if is_hello(message):
                requested, last_seq = parse_hello(message)
            else:
                pending = message  # an implicit empty hello
        except Refused as exc:
            problem = exc
        device = await asyncio.to_thread(resources.device_summary)
        service = self.service
        try:
            session, resumed = service.sessions.open(requested)
        except SessionsFull as exc:
            log.warning("refused a connection: %s", exc)
            await websocket.close(1013, "Server full: too many sessions in use, try again later")
            raise
        engine = service.engine
        # Welcome, then what it has not seen, then live events: nothing here awaits, so nothing emitted
        # meanwhile can fall between the replay and the live stream.
        connection.send(protocol.welcome(session.id, resumed, engine.name, engine.capabilities(), device,
                                         service.models.train_status()))
        if session.seq > last_seq:
            connection.replay(session.records(last_seq, session.seq))
        session.attach(connection)
        if resumed:
            service.metrics.resumes.inc()
            service.metrics.replayed.inc(max(0, session.seq - last_seq))
        log.info("session %s %s", session.label, "resumed" if resumed else "opened")
        if requested is not None and not resumed:
            connection.send(protocol.log("The session you asked for is not known here: sessions are cleared when "
                                         "the server restarts (unless server.keep_sessions_over_restart is set) "
                                         "and forgotten after a day without a client. This is a new session; "
                                         "earlier answers cannot be resumed."))
        if problem:
            connection.send(error(str(problem)))
        return session, pending

    async def dispatch(self, session: Session, connection: Connection, raw: str | bytes | dict) -> None:
        kind = None
        try:
            message = raw if isinstance(raw, dict) else parse_json(raw)
            kind = check_message(message)
            if kind in ADMIN_TYPES and connection.admin_problem:
                raise Refused(f"{kind} needs the admin scope: {connection.admin_problem}")
            await self._act(session, connection, kind, message)
        except Refused as exc:
            connection.send(error(str(exc), **exc.fields))
        except LLMWSError as exc:  # busy: the queue or the buffer is full
            connection.send(error(str(exc)))
        except Exception:  # a bug: logged whole, and the client is told which request met it
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s handling %s in session %s", incident, kind, session.label)
            connection.send(error(f"Internal error (incident {incident}): the server's log has the details"))

    async def _act(self, session: Session, connection: Connection, kind: str, message: dict) -> None:
        """Act on a frame. One with a request_id runs once however often it comes: a client sends it again
        when a cut may have lost it."""
        handle: Handler = getattr(self, f"on_{kind}")
        request_id = message.get("request_id") if kind not in REPLIED_AGAIN else None
        if not request_id:
            return await handle(session, connection, message)
        fingerprint = protocol.fingerprint(message)
        if session.is_a_retry(request_id, fingerprint):
            log.info("session %s sent request %s again after a cut: it runs once", session.label, request_id)
            return
        previous = session.take(request_id, fingerprint)
        try:
            await handle(session, connection, message)
        except LLMWSError:
            session.untake(request_id, previous)
            raise

    # -- messages --------------------------------------------------------------------------------

    async def on_inference(self, session: Session, connection: Connection, message: dict) -> None:
        await self.service.submit(session, inference_request(message, session.config))

    async def on_config(self, session: Session, connection: Connection, message: dict) -> None:
        session.overrides.update(settings_update(message.get("data"), "data"))
        connection.send(protocol.config_ack(session.config))

    async def on_ping(self, session: Session, connection: Connection, message: dict) -> None:
        connection.send(protocol.pong())

    async def on_ack(self, session: Session, connection: Connection, message: dict) -> None:
        session.clear_buffer()
        connection.send(protocol.ack_received())

    async def on_cancel(self, session: Session, connection: Connection, message: dict) -> None:
        request_id = message.get("request_id") or next(iter(session.jobs), None)
        job = session.jobs.get(request_id) if request_id else None
        if job is None:
            raise Refused(f"No request {request_id} to cancel" if request_id else "No request to cancel")
        assert request_id is not None  # the job was found by it
        self.service.cancel(session, job)
        connection.send(protocol.cancelled(request_id))

    async def on_embed(self, session: Session, connection: Connection, message: dict) -> None:
        """Answered when the vectors come, while the connection reads on (a cancel, more requests); a reply,
        not a stream: one lost to a cut is asked again."""
        if len(connection.embedding) >= MAX_EMBEDDINGS_IN_FLIGHT:
            raise Busy(f"Too many embed requests at once: at most {MAX_EMBEDDINGS_IN_FLIGHT} per connection")

        async def reply() -> None:
            try:
                embedded = await self.service.embed(message.get("input"), session)
                connection.send(protocol.embeddings(embedded.vectors, embedded.tokens, self.service.engine.name,
                                                    message.get("request_id")))
            except LLMWSError as exc:
                tag = {"request_id": message["request_id"]} if message.get("request_id") else {}
                connection.send({**error(str(exc), **getattr(exc, "fields", {})), **tag})
        task = asyncio.create_task(reply())
        connection.embedding.add(task)
        task.add_done_callback(connection.embedding.discard)

    # -- model control ---------------------------------------------------------------------------

    async def on_get_resources(self, session: Session, connection: Connection, message: dict) -> None:
        connection.send(protocol.resources(*await self.service.models.resources()))

    async def on_get_status(self, session: Session, connection: Connection, message: dict) -> None:
        models = self.service.models
        memory = await models.memory()
        connection.send(protocol.status(models.status(), memory, len(self.service.sessions.sessions),
                                        models.train_status()))

    async def on_list_models(self, session: Session, connection: Connection, message: dict) -> None:
        connection.send(protocol.models_list(await self.service.models.models()))

    async def on_switch_model(self, session: Session, connection: Connection, message: dict) -> None:
        self.service.models.switch(session, message.get("model_path"), message.get("request_id"))

    async def on_recheck_model(self, session: Session, connection: Connection, message: dict) -> None:
        unchanged = await self.service.models.recheck(session)
        if unchanged is not None:
            connection.send(protocol.recheck_complete(True, unchanged, "unchanged"))

    async def on_download_model(self, session: Session, connection: Connection, message: dict) -> None:
        request_id = message.get("request_id")
        self.service.models.download(session, message.get("repo"), message.get("target_dir"), message.get("file"),
                                     request_id)
        tag = {"request_id": request_id} if request_id else {}  # on every answer
        connection.send({**protocol.download_started(), **tag})

    async def on_delete_model(self, session: Session, connection: Connection, message: dict) -> None:
        connection.send(protocol.model_deleted(await self.service.models.delete(message.get("model_name"))))

    async def on_train(self, session: Session, connection: Connection, message: dict) -> None:
        models = self.service.models
        models.train(session, train_request(message, models.datasets), self.limits["queue_size_per_client"])

    async def on_train_status(self, session: Session, connection: Connection, message: dict) -> None:
        connection.send(protocol.train_status(self.service.models.train_status()))

    async def on_save_snapshot(self, session: Session, connection: Connection, message: dict) -> None:
        self.service.models.snapshot(session, message.get("name"), message.get("request_id"),
                                     self.limits["queue_size_per_client"])
