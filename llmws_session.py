"""The client's link to its session: connect, reconnect with backoff and resume with `last_seq`, send
frames, and route what comes back (direct replies in order, numbered messages to their stream).
llmws_client.py builds the API on it."""
import asyncio
import json
import random
import ssl
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

RETRY_CLOSE_CODES = {1001, 1006, 1011, 1012, 1013}  # going away, lost, server error/restart, try later


class Reopened:
    """Put among the direct replies when a reconnect opens connection number `opened`: a frame sent on an
    older connection, or its reply, may have been lost with it (direct replies are not replayed)."""

    def __init__(self, opened: int):
        self.opened = opened


class LLMWSError(Exception):
    """An `error` from the server; its other fields (max_context, input_length, …) are in `fields`."""

    def __init__(self, message: dict):
        super().__init__(message.get("message", "error"))
        self.fields = {key: value for key, value in message.items() if key not in ("type", "message")}
        self.max_context = message.get("max_context")
        self.input_length = message.get("input_length")


class ResumingSession:
    """One session's connection: it reconnects by itself after a drop and takes up its session with
    `last_seq`, so a stream continues with no gap and no duplicate; frames go out, and what comes back
    is routed to the direct replies or to its stream."""

    def __init__(self, host="localhost", port=8765, session_id=None, token=None, tls=False, retries=6,
                 on_status=None, on_message=None):
        self.url = f"{'wss' if tls else 'ws'}://{host}:{port}/" + (f"?token={quote(token)}" if token else "")
        self.tls = tls
        self.session_id = session_id
        self.retries = retries
        self.on_status = on_status or (lambda text: None)  # reconnect notices, queue positions
        self.on_message = on_message  # sees every message from the server (llm.py --json)
        self.last_done = None  # the `done` of the latest answer: total_tokens, tokens_per_s
        self.welcome = None
        self.last_seq = 0
        self._websocket = None
        self._reader = None
        self._replies = asyncio.Queue()  # direct answers, in the order the frames were sent
        self._streams = {}  # request_id -> Queue of its stream messages
        self._ask_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._opened = 0  # connections opened so far; the current one's number
        self._closing = False

    # -- connection ------------------------------------------------------------------------------

    async def connect(self) -> dict:
        self._closing = False
        await self._open()
        self._reader = asyncio.create_task(self._read_forever())
        return self.welcome

    async def _open(self) -> None:
        context = ssl.create_default_context() if self.tls else None
        self._websocket = await connect(self.url, ssl=context, max_size=None, open_timeout=10)
        hello = {"session_id": self.session_id, "last_seq": self.last_seq} if self.session_id else {}
        await self._websocket.send(json.dumps(hello))
        welcome = json.loads(await asyncio.wait_for(self._websocket.recv(), 30))
        if welcome.get("type") != "welcome":
            raise LLMWSError({"message": f"expected a welcome, got {welcome.get('type')}"})
        if welcome["session_id"] != self.session_id:
            self.last_seq = 0  # a fresh session numbers from 1 again
        self.session_id = welcome["session_id"]
        self.welcome = welcome
        self._opened += 1
        self._connected.set()

    async def _read_forever(self) -> None:
        while True:
            try:
                async for raw in self._websocket:
                    self._route(json.loads(raw))
            except ConnectionClosed:
                pass
            except Exception as exc:  # a callback failed (a closed stdout, say): end every waiter with it
                self._fail_all(exc)
                await self._websocket.close()
                return
            self._connected.clear()
            if self._closing or not await self._reconnect():
                self._fail_all(ConnectionError("connection to the server lost"))
                return

    async def _reconnect(self) -> bool:
        code = self._websocket.close_code
        if code is not None and code not in RETRY_CLOSE_CODES:
            return False  # refused, or taken over by another connection: retrying would not help
        for attempt in range(self.retries):
            delay = min(0.2 * 2 ** attempt, 5) * (0.5 + random.random())
            self.on_status(f"connection lost, reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)
            try:
                await self._open()
            except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError):
                continue
            if self._closing:  # disconnect() was called meanwhile
                self._connected.clear()
                await self._websocket.close()
                return False
            if not self.welcome["resumed"]:  # the server restarted: what was in flight is gone
                for stream in self._streams.values():
                    stream.put_nowait(ConnectionError("the server lost the session (restarted?)"))
            self._replies.put_nowait(Reopened(self._opened))
            self.on_status("reconnected")
            return True
        return False

    def _route(self, message: dict) -> None:
        if self.on_message:
            self.on_message(message)
        seq = message.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # already seen
            self.last_seq = seq
            stream = self._streams.get(message.get("request_id"))
            if stream is not None:
                stream.put_nowait(message)
            elif "request_id" not in message and message["type"] == "log":
                self.on_status(message["message"])  # news for everyone, such as a model switch
        else:
            self._replies.put_nowait(message)

    def _fail_all(self, exc: Exception) -> None:
        for queue in [self._replies, *self._streams.values()]:
            queue.put_nowait(exc)

    async def disconnect(self, send_ack=True) -> None:
        if send_ack and self._connected.is_set():
            try:
                await self.ack()
            except (ConnectionError, LLMWSError):
                pass
        self._closing = True
        if self._websocket is not None:
            await self._websocket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc_info):
        await self.disconnect()

    # -- sending ---------------------------------------------------------------------------------

    async def _send(self, message: dict) -> int:
        """Send once the connection is up; after a drop, wait for the reconnect and send again. Returns the
        number of the connection it went on."""
        for _ in range(2):
            await self._until_connected()
            opened = self._opened
            try:
                await self._websocket.send(json.dumps(message))
                return opened
            except ConnectionClosed:
                await asyncio.sleep(0.05)
        raise ConnectionError("could not send to the server")

    async def _until_connected(self, timeout: float = 60) -> None:
        """Return once connected, waiting while a reconnect is under way; ConnectionError at once when
        the client is not connected and no longer trying (it gave up, or was disconnected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._reader is None or (self._reader.done() and not self._connected.is_set()):
                raise ConnectionError("not connected to the server")
            # Even when connected this waits a turn of the loop, so that a connection cut just now is seen
            # as closed before anything is sent on it.
            connected = asyncio.ensure_future(self._connected.wait())
            try:
                await asyncio.wait({connected, self._reader}, timeout=max(deadline - loop.time(), 0),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                connected.cancel()
            if self._connected.is_set():
                return
            if loop.time() >= deadline:
                raise ConnectionError(f"no connection to the server after {timeout:.0f} s")

    async def _ask(self, message: dict, answer_type: str) -> dict:
        """Send a frame and return its direct answer (error: LLMWSError)."""
        async with self._ask_lock:
            for _ in range(3):  # sent again when the connection it went on was lost before its answer came
                reply = await self._reply(await self._send(message))
                if reply is not None:
                    break
            else:
                raise ConnectionError("no answer from the server")
        if reply["type"] == "error":
            raise LLMWSError(reply)
        if reply["type"] != answer_type:
            raise LLMWSError({"message": f"expected {answer_type}, got {reply['type']}"})
        return reply

    async def _reply(self, sent_on: float):
        """The next direct reply to a frame sent on connection `sent_on`, or None when a later connection
        opened first (the frame or its reply may be lost)."""
        while True:
            item = await self._next(self._replies)
            if not isinstance(item, Reopened):
                return item
            if item.opened > sent_on:
                return None

    @staticmethod
    async def _next(queue: asyncio.Queue):
        item = await queue.get()
        if isinstance(item, Exception):
            queue.put_nowait(item)  # every later waiter learns it too
            raise item
        return item

    async def _send_and_wait(self, message: dict, queue: asyncio.Queue) -> list[dict]:
        """Send a frame that starts a stream or task and wait for what answers it first: a direct reply
        (an error, or download_started) and/or the first numbered message on `queue`, in that order."""
        async with self._ask_lock:
            # A frame with a request_id is sent again, the same, when a cut may have lost it (the server
            # runs it once); one without waits for its answer on whichever connection brings it.
            for _ in range(3):
                sent_on = await self._send(message)
                replies = asyncio.create_task(self._reply(sent_on if "request_id" in message else float("inf")))
                first = asyncio.create_task(self._next(queue))
                done, pending = await asyncio.wait({replies, first}, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                answers = [task.result() for task in (replies, first) if task in done]
                if any(answer is not None for answer in answers):
                    return [answer for answer in answers if answer is not None]
        raise ConnectionError("no answer from the server")
