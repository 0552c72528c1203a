"""The model catalogue: folders under models/ and var/models/ holding a config.json (transformers) or a
.gguf file (llama.cpp), and the rules for turning a client's name or path into one of them."""
import json
import re
import shutil
from pathlib import Path

from llmws_server.config import Config
from llmws_server.errors import Refused

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LFS_POINTER_PREFIX = b"version https://git-lfs"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The quantisation a GGUF file's name gives by convention (name.Q4_K_M.gguf); the engine reads the real one.
GGUF_QUANTIZATION = re.compile(r"[.\-_]((?:I?Q\d\w*)|BF16|F16|F32)\.gguf$", re.IGNORECASE)


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.gguf"))


def engine_for(folder: Path, setting: str = "auto") -> str:
    """model.engine: "auto" takes llama.cpp for GGUF weights without safetensors, transformers otherwise."""
    if setting != "auto":
        return setting
    return "llama.cpp" if any(folder.glob("*.gguf")) and not any(folder.glob("*.safetensors")) else "transformers"


def model_dirs(config: Config) -> list[tuple[str, Path]]:
    """(source, folder) pairs, in the seed's order of preference."""
    return [("models", config.paths["models_dir"]), ("var", config.paths["var_dir"] / "models")]


def is_lfs_pointer(path: Path) -> bool:
    """A git-lfs pointer file left where the real weights should be."""
    if path.stat().st_size > 1024:
        return False
    with path.open("rb") as handle:
        return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def weights_problem(folder: Path) -> str | None:
    """Why a folder cannot be loaded yet (no weights, LFS pointers in their place), or None."""
    weights = [path for path in folder.rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES]
    if not weights:
        return "no weight files"
    pointers = [path.name for path in weights if is_lfs_pointer(path)]
    if pointers:
        return f"git-lfs pointers instead of weights: {', '.join(pointers)}"
    return None


def describe(folder: Path, source: str, root: Path, loaded: Path | None = None) -> dict:
    """A models_list entry: the seed's fields plus what config.json tells without loading weights."""
    try:
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model_config = {}
    engine = engine_for(folder)
    architectures = model_config.get("architectures") or [model_config.get("model_type", engine == "llama.cpp"
                                                                            and "gguf" or "unknown")]
    problem = weights_problem(folder)
    files = [path for path in folder.rglob("*") if path.is_file()]
    quantizations = sorted({match.group(1).upper() for path in files if (match := GGUF_QUANTIZATION.search(path.name))})
    return {"name": folder.name, "path": relative_path(folder, root), "source": source,
            "size_mb": round(sum(path.stat().st_size for path in files) / 1024 ** 2, 1),
            "architecture": architectures[0], "vision": "vision_config" in model_config,
            "loaded": loaded is not None and folder.resolve() == Path(loaded).resolve(),
            "complete": problem is None, "engine": engine,
            **({"quantization": ", ".join(quantizations)} if engine == "llama.cpp" and quantizations else {}),
            **({"problem": problem} if problem else {})}


def scan(config: Config, loaded: Path | None = None) -> list[dict]:
    """Every model folder. Hidden folders (downloads and installs under way) are skipped."""
    entries = []
    for source, directory in model_dirs(config):
        if not directory.is_dir():
            continue
        for folder in sorted(directory.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and is_model_folder(folder):
                entries.append(describe(folder, source, config.root, loaded))
    return entries


def auto_select(config: Config) -> Path | None:
    """The seed's rule: models/ first, then var/models/; the first complete one in that order."""
    for entry in scan(config):
        if entry["complete"]:
            return model_path(config, entry["path"])
    return None


def check_name(name: object) -> str:
    """A plain folder name: no separators, no leading dot or dash, nothing odd."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
        raise Refused(f"not a valid model name: {name!r} (letters, digits, . _ -; no leading dot)")
    return name


def delete(config: Config, name: object, loaded: Path) -> str:
    """Delete the var/models/ folder of this name and return the name; errors.Refused says why not."""
    folder = deletable(config, name, loaded)
    shutil.rmtree(folder)
    return folder.name


def deletable(config: Config, name: object, loaded: Path) -> Path:
    """The var/models/ folder a client may delete by this name; errors.Refused says why not. Models in models/
    are the operator's, deleted by hand; the loaded model is never deleted."""
    name = check_name(name)
    folder = config.paths["var_dir"] / "models" / name
    if folder.is_symlink() or not folder.is_dir():
        if (config.paths["models_dir"] / name).exists():
            raise Refused("Models in models/ must be deleted manually")
        raise Refused(f"Model not found: {name}")
    if folder.resolve() == loaded.resolve():
        raise Refused(f"Model {name} is loaded; switch to another model first")
    return folder


def find_model(config: Config, given: object) -> tuple[str, Path]:
    """(source, folder) for 'models/NAME', 'var/models/NAME' or a bare NAME. What is checked is the name the
    client gives: one plain folder name (check_name), directly under models/ or var/models/ and written no
    other way (no '..', no folders of its own). A folder of that name that is a symlink the operator put
    there (into a cache elsewhere on disk, say) is followed; the folder returned is the link's own path, so
    that the model keeps its name."""
    if not isinstance(given, str) or not given or "\x00" in given or Path(given).is_absolute():
        raise Refused(f"Model not found: {given!r} (give models/NAME, var/models/NAME or NAME)")
    where, name = Path(given).parent, Path(given).name
    if ".." in Path(given).parts:
        raise Refused(f"Model not found: {given} (give models/NAME, var/models/NAME or NAME)")
    check_name(name)
    for source, directory in model_dirs(config):
        if where != Path(".") and where not in written_forms(config, source, directory):
            continue
        candidate = directory / name
        if candidate.is_dir() and is_model_folder(candidate):
            return source, candidate
    raise Refused(f"Model not found: {given}")


def written_forms(config: Config, source: str, directory: Path) -> set[Path]:
    """How a client may write the folder of models/ (source "models") or var/models/ (source "var"): as
    config.json gives it and as the catalogue lists it, relative to the config's folder, without '..'."""
    written = config.data["paths"]["models_dir"] if source == "models" else f"{config.data['paths']['var_dir']}/models"
    forms = {Path(written), Path(relative_path(directory, config.root))}
    return {form for form in forms if not form.is_absolute() and ".." not in form.parts}


def model_path(config: Config, written: str) -> Path:
    """A model folder given on the command line, in model.path or as a catalogue path, made absolute against
    the config's folder and resolved, except for a symlink at its end (an operator's link into a cache, say),
    which is kept, so that the model keeps its name."""
    path = config.root / written
    return path.parent.resolve() / path.name if path.is_symlink() else path.resolve()


def fingerprint(folder: Path) -> tuple:
    """What changes when a model folder's files do: each file's name, size and modification time."""
    return tuple(sorted((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns)
                        for path in folder.rglob("*") if path.is_file() and (stat := path.stat())))


def relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
