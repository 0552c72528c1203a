"""Model downloads in the background, into models/<target_dir>: git + git-lfs (the seed's way), or
huggingface_hub for Hugging Face repos when that package is present. A whole repo, or one GGUF file of it
(`file`, or a .../resolve/<rev>/<file>.gguf URL): a folder the llama.cpp engine serves as it is.

Everything lands in a hidden folder beside the target first and is renamed into place only when
complete and verified, so a failed or cancelled download leaves nothing half-made."""
import asyncio
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict
from urllib.parse import urlsplit

from llmws_server.catalog import folders as catalog
from llmws_server.config import Config
from llmws_server.errors import Refused

MAX_CONCURRENT = 2
GIT_LFS_ADVICE = ("git-lfs is not installed. Install it first: sudo apt-get install git-lfs && git lfs install")
LFS_POINTER_SIZE = re.compile(rb"^size (\d+)$", re.MULTILINE)
GGUF_PATH = re.compile(r"^\w[\w.+-]*(/\w[\w.+-]*)*\.gguf$", re.ASCII)  # within the repo: no "..", no "/x", no "-x"
FILE_URL = re.compile(r"^(https://huggingface\.co/[^/]+/[^/]+)/(?:resolve|blob)/[^/]+/(.+\.gguf)$")


class HubPlace(TypedDict):
    """Where huggingface_hub's downloads take a repo from and put it (keyword arguments of both)."""
    repo_id: str
    local_dir: str
    cache_dir: str


def check_file(file: object) -> str | None:
    """A GGUF file's path inside the repo, or None for the whole repo; errors.Refused says why not."""
    if file is None:
        return None
    if not isinstance(file, str) or not GGUF_PATH.match(file):
        raise Refused("file must be the path of a .gguf file in the repo (letters, digits, . _ + - and /)")
    return file


class Downloads:
    def __init__(self, config: Config):
        self.allowed_prefixes = config.download["allowed_url_prefixes"]
        self.timeout_s = config.download["timeout_s"]
        self.models_dir = config.paths["models_dir"]
        self.root = config.root
        self.active: set[str] = set()

    def clear_leftovers(self) -> list[str]:
        """On start: remove the working folders of downloads a killed server left behind (no download runs
        yet, so every .download-* folder is one). Returns their names."""
        leftovers = sorted(self.models_dir.glob(".download-*"))
        for folder in leftovers:
            shutil.rmtree(folder, ignore_errors=True)
        return [folder.name for folder in leftovers]

    def check(self, repo: object, target_dir: object, file: object = None) -> tuple[str, Path, str | None]:
        """(url, destination, file) for a request that may go ahead; errors.Refused says why not."""
        file = check_file(file)
        if file is None and isinstance(repo, str) and (match := FILE_URL.match(repo)):  # a link to one file
            repo, file = match.groups()
            file = check_file(file)
        if not isinstance(repo, str) or not repo or repo.startswith("-") or any(c.isspace() or ord(c) < 32
                                                                                for c in repo):
            raise Refused("repo must be a URL")
        if "@" in urlsplit(repo).netloc:
            raise Refused("repo URL must not carry credentials")
        if "::" in repo or not any(repo.startswith(prefix) for prefix in self.allowed_prefixes):
            raise Refused(f"repo must start with one of: {', '.join(self.allowed_prefixes)}")
        name = catalog.check_name(target_dir)
        destination = self.models_dir / name
        if destination.exists() or destination.is_symlink():
            raise Refused(f"models/{name} exists already")
        if name in self.active:
            raise Refused(f"models/{name} is being downloaded already")
        if len(self.active) >= MAX_CONCURRENT:
            raise Refused(f"{MAX_CONCURRENT} downloads are running; try again when one is done")
        return repo, destination, file

    async def download(self, url: str, destination: Path, log: Callable[[str], None], file: str | None = None) -> dict:
        """Fetch, verify, move into place; `log(text)` reports progress. Returns the catalogue entry."""
        self.active.add(destination.name)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".download-{destination.name}-", dir=self.models_dir))
        try:
            await asyncio.wait_for(self._fetch(url, work, log, file), self.timeout_s)
            if file:
                _keep_only(work, file)
            else:
                shutil.rmtree(work / ".git", ignore_errors=True)
                shutil.rmtree(work / ".cache", ignore_errors=True)
                if not (work / "config.json").is_file():
                    raise RuntimeError("the repository has no config.json: not a transformers model")
                problem = catalog.weights_problem(work)
                if problem:
                    raise RuntimeError(f"the download is incomplete: {problem}")
            work.rename(destination)
            return catalog.describe(destination, "models", self.root)
        except asyncio.TimeoutError:
            raise RuntimeError(f"timed out after {self.timeout_s} s") from None
        finally:
            self.active.discard(destination.name)
            shutil.rmtree(work, ignore_errors=True)

    async def _fetch(self, url: str, work: Path, log: Callable[[str], None], file: str | None = None) -> None:
        if url.startswith("https://huggingface.co/") and importlib.util.find_spec("huggingface_hub"):
            log(f"Using huggingface_hub.{'hf_hub_download' if file else 'snapshot_download'}")
            await self._snapshot(url, work, log, file)
        else:
            log("Using git + git-lfs")
            await self._git(url, work, log, file)

    async def _git(self, url: str, work: Path, log: Callable[[str], None], file: str | None = None) -> None:
        if await _run(["git", "lfs", "version"], check=False) != 0:
            raise RuntimeError(GIT_LFS_ADVICE)
        progress_file = work.parent / f"{work.name}.progress"
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1",
               "GIT_LFS_PROGRESS": str(progress_file)}
        try:
            log("Cloning repository...")
            await _run(["git", "clone", "--depth", "1", "--", url, str(work)], env=env)
            wanted = [work / file] if file else [path for path in work.rglob("*") if ".git" not in
                                                  path.relative_to(work).parts]
            total = sum(_pointer_size(path) for path in wanted if path.is_file())
            log(f"Downloading LFS objects ({total / 1024 ** 2:.1f} MB)...")
            only = ["--include", file] if file else []
            pull = asyncio.create_task(_run(["git", "-C", str(work), "lfs", "pull", *only], env=env))
            while not pull.done():
                await asyncio.wait({pull}, timeout=0.5)
                done = _lfs_bytes(progress_file)
                if total and done:
                    log(f"LFS objects: {done / 1024 ** 2:.1f}/{total / 1024 ** 2:.1f} MB ({100 * done // total}%)")
            await pull
        finally:
            progress_file.unlink(missing_ok=True)

    async def _snapshot(self, url: str, work: Path, log: Callable[[str], None], file: str | None = None) -> None:
        from huggingface_hub import hf_hub_download, snapshot_download

        repo_id = "/".join(urlsplit(url).path.strip("/").split("/")[:2])
        # The hub's cache (refs, file trees) goes in the work folder too, which is cleared after: nothing is
        # written outside the project (by default it would go to ~/.cache/huggingface).
        where: HubPlace = {"repo_id": repo_id, "local_dir": str(work), "cache_dir": str(work / ".cache" / "hub")}
        fetch = asyncio.create_task(
            asyncio.to_thread(lambda: hf_hub_download(filename=file, **where)) if file else
            asyncio.to_thread(lambda: snapshot_download(**where)))
        while not fetch.done():
            await asyncio.wait({fetch}, timeout=2)
            size = sum(path.stat().st_size for path in work.rglob("*") if path.is_file())
            log(f"Downloaded {size / 1024 ** 2:.1f} MB")
        await fetch


async def _run(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> int:
    """Run a command (an argument list, never a shell); its output becomes the error if it fails."""
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if check and process.returncode != 0:
        last_lines = output.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} {argv[1]} failed: {' '.join(last_lines)}")
    assert process.returncode is not None  # communicate() waited for the process to end
    return process.returncode


def _keep_only(work: Path, file: str) -> None:
    """Leave only `file`, a real GGUF file, in `work`, under its own name: a folder for the llama.cpp engine."""
    source = work / file
    if source.is_symlink() or not source.resolve().is_relative_to(work.resolve()) or not source.is_file():
        raise RuntimeError(f"the repository has no {file}")  # a link, maybe to a file of this machine, is not it
    with source.open("rb") as head:
        if head.read(4) != b"GGUF":
            raise RuntimeError(f"{file} is not a GGUF file (or its LFS object was not fetched)")
    kept = source.rename(work / ".llmws-kept")
    for entry in work.iterdir():
        if entry != kept:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    kept.rename(work / Path(file).name)


def _pointer_size(path: Path) -> int:
    if not catalog.is_lfs_pointer(path):
        return 0
    match = LFS_POINTER_SIZE.search(path.read_bytes())
    return int(match.group(1)) if match else 0


def _lfs_bytes(progress_file: Path) -> int:
    """Bytes fetched so far, from git-lfs's progress lines: '<dir> <n>/<files> <bytes>/<total> <name>'."""
    try:
        lines = progress_file.read_text().splitlines()
    except OSError:
        return 0
    latest = {}
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) == 4 and "/" in parts[2]:
            latest[parts[3]] = int(parts[2].split("/")[0])
    return sum(latest.values())
