#!/usr/bin/env python3
"""LLMWS: a WebSocket server that streams tokens from a Hugging Face model and never loses an answer.

    python llmws.py [--config config.json] [--host H] [--port P] [--model PATH]
"""
import argparse
import asyncio
import logging
import logging.handlers
import errno
import signal
import socket
import ssl
import sys
from pathlib import Path

from llmws_server import catalog
from llmws_server.config import ConfigError, load_config
from llmws_server.default_model import install_default_model
from llmws_server.engine import Engine
from llmws_server.server import LLMWSServer

log = logging.getLogger("llmws")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")),
                        help="configuration file (written with the defaults if missing)")
    parser.add_argument("--host", help="interface to listen on (default: server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    parser.add_argument("--model", help="model folder to serve (default: model.path, else auto-select)")
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


def choose_model(config, override) -> Path:
    """--model, else model.path, else the seed's auto-selection, else the default model (installed once)."""
    chosen = override or config.model["path"]
    if chosen:
        path = config.resolve(chosen)
        if not (path / "config.json").is_file():
            raise SystemExit(f"Model not found: {path} has no config.json")
        return path
    return catalog.auto_select(config) or install_default_model(config.paths["models_dir"])


def tls_context(server_config):
    if not server_config["tls_cert"]:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_config["tls_cert"], server_config["tls_key"])
    return context


def take_port(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything else happens, so that a start that cannot listen changes
    nothing (not the sessions of a server already running there, not the models)."""
    if not 1 <= port <= 65535:
        raise SystemExit(f"llmws: port {port} is not a TCP port (1-65535)")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(f"llmws: port {port} is in use: is another llmws running? try --port {port + 1}")
        raise SystemExit(f"llmws: cannot listen on {host}:{port}: {exc.strerror or exc}")


async def serve(server: LLMWSServer, listening: socket.socket) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server.worker.start()
    expiry = asyncio.create_task(server.expire_sessions())
    async with server.serve(listening, ssl=tls_context(server.config.server)) as listener:
        bound = ", ".join(f"{sock.getsockname()[0]}:{sock.getsockname()[1]}" for sock in listener.sockets)
        log.info("listening on %s", bound)
        await stop.wait()
        log.info("shutting down")
        listener.close(close_connections=False)
        for connection in list(server.connections):
            await connection.websocket.close(1001, "Server shutting down")
    expiry.cancel()
    server.worker.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llmws: {exc}", file=sys.stderr)
        return 2
    listening = take_port(args.host or config.server["host"],
                          config.server["port"] if args.port is None else args.port)
    for name in ("models_dir", "sessions_dir", "logs_dir"):
        config.paths[name].mkdir(parents=True, exist_ok=True)
    (config.paths["var_dir"] / "models").mkdir(parents=True, exist_ok=True)
    setup_logging(config.paths["logs_dir"])
    model_dir = choose_model(config, args.model)
    engine = Engine.for_config(model_dir, config)
    server = LLMWSServer(config, engine)
    server.sessions.clear_all()  # a start that got this far owns the port: earlier sessions end here
    asyncio.run(serve(server, listening))
    return 0


if __name__ == "__main__":
    sys.exit(main())
