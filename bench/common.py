"""What the bench scripts share: a free loopback port, a server started on it, its peak memory."""
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks load models as the server does (llmws_server)
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model, port: int, folder: Path, config: dict | None = None) -> subprocess.Popen:
    """python llmws.py on 127.0.0.1:port with a config in `folder`; returns once it listens."""
    (folder / "config.json").write_text(json.dumps({"server": {"host": "127.0.0.1", "http_port": None},
                                                    **(config or {})}))
    process = subprocess.Popen([sys.executable, str(REPO / "llmws.py"), "--config", str(folder / "config.json"),
                                "--port", str(port), "--model", str(model)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "listening on" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            return process
    raise RuntimeError("the server did not start")


class PeakMemory:
    """A process's peak resident memory, sampled every 0.1 s until `running` is set false."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)
