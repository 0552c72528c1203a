#!/usr/bin/env python3
"""LLMWS: a WebSocket server that streams tokens from a Hugging Face model and never loses an answer.

    python llmws.py [--config config.json] [--host H] [--port P] [--http-port P] [--model PATH]
"""
import argparse
import asyncio
import errno
import logging
import logging.handlers
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llmws_server.catalog import folders as catalog
from llmws_server.config import DEFAULTS, load_config
from llmws_server.errors import ConfigError

if TYPE_CHECKING:
    from llmws_server.listeners import ConnectionPolicy

# The server's modules (torch, transformers, uvicorn) are imported in main(), after the arguments are read:
# --help and argument errors answer at once.

log = logging.getLogger("llmws")


EXAMPLES = """examples:
  python llmws.py                                   serve the default model (installed on first start)
  python llmws.py --model models/SmolLM2-135M-Instruct-GGUF   the same model on llama.cpp (GGUF)
  python llmws.py --host 127.0.0.1 --port 9000 --http-port 0  this machine only, no HTTP API

then open http://localhost:8765/ in a browser, or run: python llm.py"""


def parse_args(argv=None):
    server = DEFAULTS["server"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")),
                        help="configuration file, written with the defaults if missing (default: %(default)s)")
    parser.add_argument("--host", help=f"interface to listen on (default: server.host, {server['host']})")
    parser.add_argument("--port", type=int, help=f"WebSocket port, also serving the web page (default: "
                                                 f"server.port, {server['port']})")
    parser.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port, 0 for none "
                                                      f"(default: server.http_port, {server['http_port']})")
    parser.add_argument("--model", help="model folder to serve: models/NAME, var/models/NAME or any path "
                                        "(default: model.path, else the first complete model in models/, "
                                        "else the default model)")
    return parser.parse_args(argv)


def setup_logging(logs_dir: Path) -> None:
    logs_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.handlers.RotatingFileHandler(logs_dir / "llmws.log", maxBytes=10 * 1024 ** 2, backupCount=3)
    to_stdout = logging.StreamHandler(sys.stdout)
    for handler in (to_file, to_stdout):
        handler.setFormatter(formatter)
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)


def choose_model(config, override) -> Path:
    """--model, else model.path, else the seed's auto-selection, else the default model (installed once)."""
    chosen = override or config.model["path"]
    if chosen:
        path = catalog.model_path(config, chosen)  # a symlink into a cache keeps its name, as in a switch
        if not catalog.is_model_folder(path):
            known = ", ".join(entry["path"] for entry in catalog.scan(config)) or "none yet"
            raise SystemExit(f"Model not found: {path} has no config.json and no .gguf file; relative paths are "
                             f"read from {config.root}, the config file's folder (models here: {known})")
        return path
    from llmws_server.catalog.default_model import install_default_model
    return catalog.auto_select(config) or install_default_model(config.paths["models_dir"])


def tls_context(server_config):
    if not server_config["tls_cert"]:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_config["tls_cert"], server_config["tls_key"])
    return context


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Before anything else happens, make sure the port can be listened on, so that a start that cannot
    listen changes nothing (not the sessions of a server already running there, not the models)."""
    if not 1 <= port <= 65535:
        raise SystemExit(f"llmws: port {port} is not a TCP port (1-65535)")
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:
        raise SystemExit(cannot_listen(host, port, exc, option))


def cannot_listen(host: str, port: int, exc: OSError, option: str = "--port") -> str:
    if exc.errno == errno.EADDRINUSE:
        hint = " (or --http-port 0 for no HTTP API)" if option == "--http-port" else ""
        return f"llmws: port {port} is in use: is another llmws running? try {option} {port + 1}{hint}"
    return f"llmws: cannot listen on {host}:{port}: {exc.strerror or exc}"


def connection_policy(limits: dict) -> "ConnectionPolicy":
    """Both ports' caps at accept, under the open-files limit (raised to the hard one first)."""
    from llmws_server.listeners import RESERVED_FILES, ConnectionPolicy, raise_open_files_limit

    before, now = raise_open_files_limit()
    policy = ConnectionPolicy.from_limits(limits, now)
    log.info("connections: at most %d at once over both ports, %d per address (limits.max_connections, "
             "max_connections_per_ip); open-files limit %d%s, %d kept for files and models", policy.total,
             policy.per_address, now, f" (raised from {before})" if now > before else "", RESERVED_FILES)
    return policy


async def serve(service, host: str, port: int, http_port: int | None) -> None:
    """The two front ends over one Service: the WebSocket on `port`, the HTTP APIs on `http_port`."""
    from llmws_server.listeners import RepeatedLog
    from llmws_server.ws.server import WebSocketServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    settings = service.config.server
    policy = connection_policy(service.config.limits)
    if not settings["admin_token"]:
        log.info("model management and training only from this machine (loopback addresses): set "
                 "server.admin_token to allow it from elsewhere")
    loop.set_exception_handler(RepeatedLog(logging.getLogger("asyncio")).loop_errors)
    websocket = WebSocketServer(service)
    try:
        listening = await websocket.serve(host, port, ssl=tls_context(settings), policy=policy)
    except OSError as exc:  # taken since check_port looked
        raise SystemExit(cannot_listen(host, port, exc))
    # This start owns the port: earlier sessions and half-done downloads end here (no client is read
    # before the next await).
    await service.start()
    housekeeping = asyncio.create_task(service.housekeeping())
    http, http_task = None, None
    if http_port:
        from llmws_server.http.app import http_server
        http = http_server(service, host, http_port, (settings["tls_cert"], settings["tls_key"]), policy)
        http_task = asyncio.create_task(http.serve())
        while not http.started:  # uvicorn binds in its first steps
            if http_task.done():
                raise SystemExit(f"llmws: the HTTP API could not start on port {http_port}")
            await asyncio.sleep(0.02)
        scheme = "https" if settings["tls_cert"] else "http"
        log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, host, http_port)
    async with listening:
        secure = bool(settings["tls_cert"])
        bound = ", ".join(f"{'wss' if secure else 'ws'}://{sock.getsockname()[0]}:{sock.getsockname()[1]}"
                          for sock in listening.sockets)
        page_host = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1", "::1") else host
        log.info("listening on %s: open %s://%s:%d/ in a browser, or run: python llm.py%s", bound,
                 "https" if secure else "http", page_host, port, "" if port == 8765 else f" --port {port}")
        await stop.wait()
        log.info("shutting down")
        service.stop()  # what has not ended ends now, each with an error its client sees (or finds on resume)
        listening.close(close_connections=False)
        await websocket.close_all()
    if http:
        http.should_exit = True
        await http_task
    housekeeping.cancel()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.umask(0o077)  # logs and session buffers hold answers: what the server writes is its user's only
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llmws: {exc}", file=sys.stderr)
        return 2
    host, port = args.host or config.server["host"], config.server["port"] if args.port is None else args.port
    http_port = config.server["http_port"] if args.http_port is None else args.http_port or None
    check_port(host, port)
    if http_port:
        check_port(host, http_port, "--http-port")
    for name in ("models_dir", "sessions_dir", "logs_dir"):
        config.paths[name].mkdir(parents=True, exist_ok=True)
    (config.paths["var_dir"] / "models").mkdir(parents=True, exist_ok=True)
    setup_logging(config.paths["logs_dir"])
    for key in config.ignored:
        log.info("config.json: %s is the original LLMWS's and is not used here", key)
    model_dir = choose_model(config, args.model)
    from llmws_server.core.service import Service
    from llmws_server.engines.registry import load_engines
    from llmws_server.errors import Refused
    from llmws_server.ws.wire import CODEC
    try:
        engines = load_engines(model_dir, config)
    except (Refused, MemoryError) as exc:
        raise SystemExit(f"llmws: {exc}")
    asyncio.run(serve(Service(config, engines, CODEC), host, port, http_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
