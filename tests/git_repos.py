"""Git repositories for download tests: a folder as a bare git-lfs repository, and a gated git that holds
the server's `git lfs pull` where a test wants it to wait."""
import asyncio
import os
import shutil
import subprocess
from pathlib import Path


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def lfs_repo_of(folder: Path, bare: Path, lfs_files="*.safetensors") -> Path:
    """`folder` as a bare git repository whose `lfs_files` are LFS objects."""
    git("init", "-q", "-b", "main", cwd=folder)
    git("lfs", "install", "--local", cwd=folder)
    git("lfs", "track", lfs_files, cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-qm", "model", cwd=folder)
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=folder.parent)
    git("push", "-q", f"file://{bare}", "main", cwd=folder)
    return bare


def gated_git(base: Path) -> Path:
    """A folder of gates for the server's `git lfs pull`: while `before-pull` exists the pull waits to
    start (it touches `pull-reached`); while `after-pull` exists, a finished pull waits to exit (it
    touches `pull-finished`). The git on the server's PATH is the real one behind this script."""
    gates, bin_dir = base / "gates", base / "bin"
    gates.mkdir()
    bin_dir.mkdir()
    script = bin_dir / "git"
    script.write_text(f"""#!/bin/sh
case " $* " in *" lfs pull "*)
  touch "{gates}/pull-reached"
  while [ -e "{gates}/before-pull" ]; do sleep 0.05; done
  "{shutil.which('git')}" "$@"; status=$?
  touch "{gates}/pull-finished"
  while [ -e "{gates}/after-pull" ]; do sleep 0.05; done
  exit $status;;
esac
exec "{shutil.which('git')}" "$@"
""")
    script.chmod(0o755)
    return gates


def gated_path(gates: Path) -> str:
    """The server's PATH with the gated git first."""
    return f"{gates.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"


async def until_exists(path: Path, timeout=60) -> None:
    for _ in range(timeout * 20):
        if path.exists():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path.name} did not appear in {timeout} s")
