"""Ollama's API under /api/ (http/ollama_shapes.py has the request checks and shapes, http/runs.py the
running), so that an app with only an Ollama integration works unchanged with this server's address:

    GET, HEAD /        "Ollama is running" (clients probe it; no token needed)
    GET /api/version   the Ollama API version these endpoints follow
    GET /api/tags      the installed models; GET /api/ps the loaded one; POST /api/show one's details
    POST /api/chat, POST /api/generate   NDJSON lines as they come (stream: false: one object)
    POST /api/embed, POST /api/embeddings   the loaded model's vectors
    POST /api/pull, DELETE /api/delete   this server's download and delete, in the admin scope

One model answers: the loaded one, by its name or name:latest; another name is refused with 404 (an
installed one says so: models are switched by an admin over the WebSocket). Refusals are Ollama's
{"error": message} with the status; a stream's failure is its last line, {"error": message}.
"""
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmws_server.access import is_loopback, same_secret
from llmws_server.catalog import folders as catalog
from llmws_server.core.events import (
    DownloadDone,
    Failed,
    Log,
    Queued,
    Reasoning,
    Started,
    Text,
    ToolCallArguments,
    ToolCallStarted,
)
from llmws_server.core.requests import InferenceRequest
from llmws_server.errors import Refused
from llmws_server.http import ollama_shapes as shapes
from llmws_server.http import runs
from llmws_server.http.doors import client_address, presented_key
from llmws_server.http.errors import APIError
from llmws_server.http.ollama_shapes import OllamaRequest, Reply, Timing
from llmws_server.http.openai_shapes import check_dimensions
from llmws_server.http.runs import Finished, Stream, Told, refusal
from llmws_server.sessions.store import Session, StreamSession

if TYPE_CHECKING:
    from llmws_server.engines.api import Engine
    from llmws_server.http.app import Endpoint, HTTPApi

VERSION = "0.12.0"  # the Ollama API whose fields these endpoints follow (clients read it to pick features)
NDJSON = "application/x-ndjson"
LFS_PROGRESS = re.compile(r"LFS objects: ([\d.]+)/([\d.]+) MB")  # the download's progress lines (downloads.py)


def routes(api: "HTTPApi") -> list[Route]:
    endpoints = OllamaEndpoints(api)

    def route(path: str, handler: "Endpoint", method: str) -> Route:
        return Route(path, api.endpoint(handler, shape=shapes.error_body), methods=[method])
    return [Route("/", api.endpoint(endpoints.running, guarded=False, shape=shapes.error_body), methods=["GET"]),
            route("/api/version", endpoints.version, "GET"), route("/api/tags", endpoints.tags, "GET"),
            route("/api/ps", endpoints.ps, "GET"), route("/api/show", endpoints.show, "POST"),
            route("/api/chat", partial(endpoints.answer, chat=True), "POST"),
            route("/api/generate", partial(endpoints.answer, chat=False), "POST"),
            route("/api/embed", endpoints.embed, "POST"), route("/api/embeddings", endpoints.embeddings, "POST"),
            route("/api/pull", endpoints.pull, "POST"), route("/api/delete", endpoints.delete, "DELETE")]


def thinks(engine: "Engine", split_reasoning: bool) -> bool:
    """The model reasons in <think> tags, which come apart as `thinking` (the core's rule, tools.parser_for)."""
    return split_reasoning and "<think>" in (engine.chat_template or "")


def ndjson(pieces: AsyncIterator[dict], headers: dict | None = None) -> StreamingResponse:
    """One JSON object a line, each sent as it comes."""
    async def lines() -> AsyncIterator[bytes]:
        async for shape in pieces:
            yield (json.dumps(shape, ensure_ascii=False) + "\n").encode()
    return StreamingResponse(lines(), media_type=NDJSON, headers=headers)


class Answer:
    """One answer as its events come: take() gives the lines each event makes, whole() the answer in one.
    A tool call is told once it is whole, its arguments as an object (Ollama's shape); arguments that are
    no JSON object (a call cut short) are told as the text they are."""

    def __init__(self, reply: Reply, timing: Timing):
        self.reply, self.timing = reply, timing
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list[dict] = []
        self.call: tuple[str, int, str, list[str]] | None = None  # the call being told: id, index, name, pieces
        self.done: dict = {}

    def take(self, told: Told) -> list[dict]:
        if isinstance(told, Queued):  # still waiting: its prompt is read once it leaves the queue
            self.timing.started = time.monotonic_ns()
            return []
        if isinstance(told, Started):
            return []
        if self.timing.first is None and not isinstance(told, Finished):
            self.timing.first = time.monotonic_ns()
        if isinstance(told, Text):
            logprobs = shapes.logprobs_out(told.logprobs)
            self.text.append(told.text)
            self.logprobs.extend(logprobs)
            return [self.reply.piece(told.text, logprobs=logprobs)] if told.text or logprobs else []
        if isinstance(told, Reasoning):
            self.thinking.append(told.text)
            return [self.reply.piece(thinking=told.text)]
        if isinstance(told, ToolCallStarted):
            lines = self._call_done()
            self.call = (told.id, told.index, told.name, [])
            return lines
        if isinstance(told, ToolCallArguments) and self.call is not None:
            self.call[3].append(told.text)
        if isinstance(told, Finished):
            lines = self._call_done()
            self.done = self.timing.counts(told.reason, told.tokens_in, told.tokens_out)
            return [*lines, self.reply.piece(done=self.done)]
        return []

    def _call_done(self) -> list[dict]:
        if self.call is None:
            return []
        call_id, index, name, pieces = self.call
        self.call, arguments = None, "".join(pieces)
        call = shapes.call_out(call_id, index, name, arguments)
        if call is None:
            self.text.append(arguments)
            return [self.reply.piece(arguments)]
        self.calls.append(call)
        return [self.reply.piece(calls=[call])]

    def whole(self) -> dict:
        return self.reply.piece("".join(self.text), "".join(self.thinking), self.calls, self.logprobs, self.done)


class OllamaEndpoints:
    def __init__(self, api: "HTTPApi"):
        self.api, self.service = api, api.service

    async def running(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    # -- chat, generate ------------------------------------------------------------------------------------

    async def answer(self, request: Request, chat: bool) -> Response:
        """/api/chat or /api/generate: queue the request; answer with NDJSON lines as they come, or whole (whose
        client, should it hang up meanwhile, cancels it as a stream's does)."""
        timing = Timing.now()
        body, model = await self.served(request)
        engine, service = self.service.engine, self.service
        check = shapes.chat_request if chat else shapes.generate_request
        wanted = check(body, service.generation_defaults, engine.max_context,
                       thinks(engine, service.config.model["split_reasoning"]))
        reply = Reply(chat, model)
        if wanted.load_only:
            return JSONResponse(reply.loaded())
        run = await runs.start(service, [await self.within(wanted)], wanted.stop)
        answer, stream = Answer(reply, timing), cast(Stream, run.streams[0])
        if wanted.stream:
            return ndjson(self.lines(stream, answer), run.headers)
        return await runs.until_disconnect(request, self.whole(stream, answer, run.headers))

    async def within(self, wanted: OllamaRequest) -> InferenceRequest:
        """options.num_ctx below the model's context is a cap on prompt and answer together: a prompt that
        leaves no room is refused, the answer gets the room left. Above the model's context, that is the cap."""
        inference, most = wanted.inference, wanted.num_ctx
        if most is None or most >= self.service.engine.max_context:
            return inference
        tokens = await runs.prompt_tokens(self.service, inference)
        if tokens >= most:
            raise APIError(f"The prompt is {tokens} tokens: options.num_ctx {most} leaves no room for an answer",
                           "options.num_ctx")
        settings = inference.settings
        return replace(inference, settings=replace(settings, max_new_tokens=min(settings.max_new_tokens,
                                                                                  most - tokens)))

    async def lines(self, stream: Stream, answer: Answer) -> AsyncIterator[dict]:
        async with aclosing(stream) as told_all:  # a client that leaves closes it: the job is cancelled
            async for told in told_all:
                if isinstance(told, Failed):
                    yield shapes.error_body(refusal(told))
                    return
                for line in answer.take(told):
                    yield line

    async def whole(self, stream: Stream, answer: Answer, headers: dict) -> Response:
        async with aclosing(stream) as told_all:
            async for told in told_all:
                if isinstance(told, Failed):
                    error = refusal(told)
                    return JSONResponse(shapes.error_body(error), error.status, headers=headers)
                answer.take(told)
        return JSONResponse(answer.whole(), headers=headers)

    # -- embeddings ----------------------------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        """input: a string or a list of them. truncate is not honoured: an input over the limits is refused."""
        timing = Timing.now()
        body, model = await self.served(request)
        embedded = await self.service.embed(body.get("input"), StreamSession(), "input")
        check_dimensions(body.get("dimensions"), len(embedded.vectors[0]))
        return JSONResponse({"model": model, "embeddings": embedded.vectors,
                             "total_duration": time.monotonic_ns() - timing.arrived, "load_duration": 0,
                             "prompt_eval_count": embedded.tokens})

    async def embeddings(self, request: Request) -> Response:
        """The older endpoint: one prompt, one vector (none for no prompt, as Ollama answers)."""
        body, model = await self.served(request)
        prompt = body.get("prompt")
        if prompt in (None, ""):
            return JSONResponse({"embedding": []})
        if not isinstance(prompt, str):
            raise APIError("prompt must be a string", "prompt")
        embedded = await self.service.embed(prompt, StreamSession(), "prompt")
        return JSONResponse({"embedding": embedded.vectors[0]})

    # -- models --------------------------------------------------------------------------------------------

    async def served(self, request: Request) -> tuple[dict, str]:
        """The body and the model it names, the loaded one, or it is refused (404): another installed model is
        not switched to, since a switch changes the model for every client and is the admin's (switch_model)."""
        body, model = shapes.requested_model(await self.api.body(request))
        served = self.service.engine.name
        if shapes.same_model(model, served):
            return body, model
        if any(shapes.same_model(model, entry["name"]) for entry in await self.service.models.models()):
            raise APIError(f"model '{model}' is installed but not loaded: this server serves '{served}', one "
                           "model at a time (an admin switches models over the WebSocket)", "model", status=404)
        raise APIError(f"model '{model}' not found: this server serves '{served}'", "model", status=404)

    async def installed(self) -> list[dict]:
        """The catalogue's entries, the loaded model first (listed even when it lives outside models/)."""
        engine, root = self.service.engine, self.service.config.root
        entries = await self.service.models.models()
        loaded = [entry for entry in entries if entry["loaded"]] or [catalog.describe(engine.path, "models", root,
                                                                                     engine.path)]
        return loaded + [entry for entry in entries if not entry["loaded"]]

    def listed(self, entry: dict) -> dict:
        return shapes.listed(entry, self.service.config.root / entry["path"], self.service.engine)

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self.listed(entry) for entry in await self.installed()]})

    async def ps(self, request: Request) -> Response:
        engine = self.service.engine
        entry = self.listed((await self.installed())[0])
        vram = entry["size"] if engine.device.startswith("cuda") else 0
        return JSONResponse({"models": [{**entry, "expires_at": "2999-12-31T23:59:59Z", "size_vram": vram,
                                         "context_length": engine.max_context}]})

    async def show(self, request: Request) -> Response:
        body, model = shapes.requested_model(await self.api.body(request))
        entry = next((entry for entry in await self.installed() if shapes.same_model(model, entry["name"])), None)
        if entry is None:
            raise APIError(f"model '{model}' not found", "model", status=404)
        shown = self.listed(entry)
        family = shown["details"]["family"]
        info: dict = {"general.architecture": family, "general.basename": entry["name"]}
        template, capabilities = "", ["completion"]
        if entry["loaded"]:
            engine, settings = self.service.engine, self.service.config.model
            info |= {"general.parameter_count": engine.params, f"{family}.context_length": engine.max_context}
            template = engine.chat_template or ""
            capabilities += ["tools", "embedding", *(["vision"] if engine.vision else []),
                             *(["thinking"] if thinks(engine, settings["split_reasoning"]) else [])]
        parameters = shapes.parameters(self.service.generation_defaults)
        return JSONResponse({"modelfile": f"FROM {entry['path']}\n", "parameters": parameters, "template": template,
                             "details": shown["details"], "model_info": info, "capabilities": capabilities,
                             "modified_at": shown["modified_at"]})

    # -- pull, delete: the admin's -------------------------------------------------------------------------

    def check_admin(self, request: Request) -> None:
        """The WebSocket's admin scope (ws/handshake.py) over HTTP: the admin token when server.admin_token
        is set, else a loopback address (this machine); a browser page only from server.admin_origins (this
        port serves no page of its own)."""
        settings = self.api.settings
        admin = settings["admin_token"]
        if admin and not same_secret(presented_key(dict(request.scope["headers"])), admin):
            raise APIError("Managing models needs the admin scope: send the admin token (server.admin_token)",
                           status=403, kind="permission_error")
        if not admin and not is_loopback(client_address(request.scope)):
            raise APIError("Without server.admin_token, models are managed only from this machine (a loopback "
                           "address): set an admin token to manage them from elsewhere", status=403,
                           kind="permission_error")
        origin = request.headers.get("origin")
        if origin is not None and origin not in settings["admin_origins"]:
            raise APIError(f"Pages on {origin} may not manage models: list the origin in server.admin_origins",
                           status=403, kind="permission_error")

    async def pull(self, request: Request) -> Response:
        """The model named is a Hugging Face org/name (or hf.co/org/name) or a repository URL, fetched by
        this server's download into models/<its last name>; its log lines are the progress."""
        self.check_admin(request)
        body, model = shapes.requested_model(await self.api.body(request))
        repo, stream = shapes.pull_source(model), shapes.stream_flag(body)
        session = StreamSession()  # what download needs of a session is its emit()
        self.service.models.download(cast(Session, session), repo, Path(repo.rstrip("/")).name.removesuffix(".git"),
                                     None, None)
        progress = pulled(session)
        if stream:
            return ndjson(progress)
        async for shape in progress:
            if "error" in shape:
                raise APIError(shape["error"], status=500, kind="server_error")
        return JSONResponse({"status": "success"})

    async def delete(self, request: Request) -> Response:
        """As delete_model: a var/models/ folder, never models/ (the operator's) nor the loaded model."""
        self.check_admin(request)
        body, model = shapes.requested_model(await self.api.body(request))
        name = model.removesuffix(":latest")
        try:
            catalog.find_model(self.service.config, name)
        except Refused:
            raise APIError(f"model '{model}' not found", "model", status=404) from None
        await self.service.models.delete(name)
        return Response(status_code=200)


async def pulled(session: StreamSession) -> AsyncIterator[dict]:
    """The download's events as Ollama's progress: each log line a status (its LFS figures as completed and
    total bytes), then {"status": "success"}, or {"error": ...}."""
    while True:
        event = (await session.events.get()).event
        if isinstance(event, Log):
            shape: dict = {"status": event.text}
            if match := LFS_PROGRESS.search(event.text):
                done, total = (float(figure) for figure in match.groups())
                shape |= {"digest": "lfs", "completed": int(done * shapes.MB), "total": int(total * shapes.MB)}
            yield shape
        elif isinstance(event, DownloadDone):
            yield {"status": "success"}
            return
        elif isinstance(event, Failed):
            yield {"error": event.message}
            return
