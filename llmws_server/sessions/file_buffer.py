"""The session buffer in a file: var/sessions/<id>/buffer.jsonl, one obfuscated line per message.

A line is {"id": "<uuid>", "data": "<base64 of the message JSON XOR-ed with b'llmws'>"}: obfuscation, not
encryption. Only the server's user may read it (mode 0600 in a 0700 folder): it holds the answers.
"""
import base64
import binascii
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("llmws.sessions")
KEY = b"llmws"


def simple_encrypt(data: str) -> str:
    """The seed's XOR + base64 obfuscation (not security)."""
    raw = data.encode("utf-8")
    return base64.b64encode(bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(raw))).decode("ascii")


def simple_decrypt(data: str) -> str:
    raw = base64.b64decode(data)
    return bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(raw)).decode("utf-8")


class FileBuffer:
    """One session's buffer (sessions.store.Buffer): appended line by line, read back as it is needed."""

    def __init__(self, sessions_dir: Path, session_id: str):
        self.file = sessions_dir / session_id / "buffer.jsonl"

    def append(self, record: dict) -> int:
        """Write one message; returns the bytes written. OSError when it cannot be written."""
        line = json.dumps({"id": str(uuid.uuid4()), "data": simple_encrypt(json.dumps(record))}) + "\n"
        self.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8") as handle:
            handle.write(line)
        return len(line)

    def records(self, label: str) -> Iterator[dict]:
        """Every readable message, in order, read line by line as they are taken."""
        try:
            handle = self.file.open(encoding="utf-8")
        except OSError:
            return
        with handle:
            for line in handle:
                try:
                    yield json.loads(simple_decrypt(json.loads(line)["data"]))
                except (ValueError, KeyError, binascii.Error) as exc:
                    log.warning("session %s: skipping an unreadable buffer line (%s)", label, exc)

    def clear(self) -> None:
        shutil.rmtree(self.file.parent, ignore_errors=True)


def clear_all(sessions_dir: Path) -> None:
    """Every session's buffer gone (on start: the seed clears them)."""
    shutil.rmtree(sessions_dir, ignore_errors=True)
    sessions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def clear_all_of(folder: Path) -> None:
    """One session's folder gone (on start, one that is not kept)."""
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    else:
        folder.unlink(missing_ok=True)
