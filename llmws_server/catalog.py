"""The model catalogue: folders under models/ and var/models/ that hold a config.json."""
from pathlib import Path


def model_dirs(config) -> list[tuple[str, Path]]:
    """(source, folder) pairs, in the seed's order of preference."""
    return [("models", config.paths["models_dir"]), ("var", config.paths["var_dir"] / "models")]


def folder_size_mb(folder: Path) -> float:
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    return round(size / 1024 ** 2, 1)


def scan(config) -> list[dict]:
    """Every model folder, as the seed's models_list entries. Hidden folders (work in progress) are skipped."""
    entries = []
    for source, directory in model_dirs(config):
        if not directory.is_dir():
            continue
        for folder in sorted(directory.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file():
                entries.append({"name": folder.name, "path": _relative(folder, config.root),
                                "source": source, "size_mb": folder_size_mb(folder)})
    return entries


def auto_select(config) -> Path | None:
    """The seed's rule: models/ first, then var/models/; the first found in that order."""
    entries = scan(config)
    return config.resolve(entries[0]["path"]) if entries else None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
