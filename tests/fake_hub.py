"""A Hugging Face hub on loopback, serving model folders, for huggingface_hub's snapshot_download and
hf_hub_download (the server reaches it through HF_ENDPOINT): the repository info, its file tree and the
files, with the headers the client reads (commit, ETag, size)."""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """repos: {"org/name": folder}. `requests` records every path asked for, in order."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo: str) -> list[Path]:
        folder = self.repos[repo]
        return sorted(path for path in folder.rglob("*") if path.is_file())

    def answer(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if repo in self.repos:
                return self.json(handler, self.info(repo) if parts[4] == "revision" else self.tree(repo), body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo in self.repos and (self.repos[repo] / name).is_file():
                return self.file(handler, self.repos[repo] / name, body)
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RepoNotFound")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def info(self, repo: str) -> dict:
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                "siblings": [{"rfilename": str(p.relative_to(self.repos[repo]))} for p in self.files(repo)]}

    def tree(self, repo: str) -> list[dict]:
        return [{"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                 "path": str(p.relative_to(self.repos[repo]))} for p in self.files(repo)]

    @staticmethod
    def json(handler, data, body: bool) -> None:
        raw = json.dumps(data).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        if body:
            handler.wfile.write(raw)

    @staticmethod
    def file(handler, path: Path, body: bool) -> None:
        raw = path.read_bytes()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(raw)))
        handler.send_header("ETag", f'"{hashlib.sha1(raw).hexdigest()}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.end_headers()
        if body:
            handler.wfile.write(raw)

    def close(self) -> None:
        self.server.shutdown()
