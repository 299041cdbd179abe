"""Where a command may write a folder the user names: never over what it did not write.

A command that writes a folder (`sabia-ift export --merged OUT`) replaces it
as a whole, atomically. So the folder it is given must be new, empty, or, with
`--overwrite`, one the user means to lose; and never, whatever the flags, the
project itself, anything the pipeline reads or writes, or a folder inside or
above one of those. Every check is on resolved paths: `.`, `..`, a symbolic
link or an absolute spelling of the same folder get the same answer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError
from .io import atomic_path

PIPELINE_FILE = "dvc.yaml"
# Folders of a project that are never written over, besides the paths dvc.yaml names.
PROJECT_FOLDERS = {".git": "git's records", ".dvc": "DVC's records", "data": "the project's data",
                   "metrics": "the project's metrics"}


@dataclass(frozen=True)
class Protected:
    path: Path  # resolved
    what: str
    # A folder may be written inside it (the project root, the current folder), never at or above it.
    inside_ok: bool = False


def project_root(start: Path | None = None) -> Path | None:
    """The folder holding dvc.yaml: `start` (the current folder) or the nearest one above it."""
    start = (start or Path.cwd()).resolve()
    return next((folder for folder in (start, *start.parents) if (folder / PIPELINE_FILE).is_file()), None)


def pipeline_paths(root: Path) -> list[str]:
    """Every path dvc.yaml names: each stage's deps, outs, metrics and plots, and the top-level plots."""
    try:
        spec = yaml.safe_load((root / PIPELINE_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    entries = list(spec.get("plots") or [])
    for stage in (spec.get("stages") or {}).values():
        for key in ("deps", "outs", "metrics", "plots"):
            entries += (stage or {}).get(key) or []
    paths = [entry if isinstance(entry, str) else next(iter(entry), "") for entry in entries]
    # A templated dep (${fetch.path}) names a file params.yaml chooses; the data folder covers the default.
    return [p for p in paths if p and "${" not in p]


def protected_paths(reads: dict[str, str | Path], start: Path | None = None) -> list[Protected]:
    """What no written folder may be, sit inside or hold; `reads` names the folders the command reads."""
    cwd = (start or Path.cwd()).resolve()
    root = project_root(cwd)

    def shown(path: Path) -> str:
        return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)

    found = [Protected(cwd, "the current folder", inside_ok=True),
             Protected(Path.home().resolve(), "your home folder", inside_ok=True)]
    if root is not None:
        found.insert(0, Protected(root, "the project root", inside_ok=True))
    for what, path in reads.items():
        resolved = Path(path).resolve()
        found.append(Protected(resolved, f"{shown(resolved)}, {what}"))
    if root is not None:
        found += [Protected(root / name, f"{name}/, {what}") for name, what in PROJECT_FOLDERS.items()]
        found += [Protected((root / rel).resolve(), f"{rel}, which {PIPELINE_FILE} names")
                  for rel in pipeline_paths(root)]
    unique: dict[Path, Protected] = {}
    for item in found:
        unique.setdefault(item.path, item)
    return list(unique.values())


def refusal(target: Path, protected: list[Protected]) -> str | None:
    """Why `target` (resolved) may never be written, or None."""
    for item in protected:
        if target == item.path:
            return f"it is {item.what}"
    for item in protected:
        if not item.inside_ok and item.path in target.parents:
            return f"it is inside {item.what}"
    for item in protected:
        if target in item.path.parents:
            return f"it holds {item.what}"
    return None


def check_destination(out: str | Path, *, flag: str, overwrite: bool, reads: dict[str, str | Path]) -> Path:
    """The resolved folder to write for `flag OUT`, or a ConfigError saying why not. Nothing is written."""
    target = Path(out).expanduser().resolve()
    why = refusal(target, protected_paths(reads))
    if why is not None:
        raise ConfigError(f"{flag} {out}: refused, even with --overwrite: {why}; write to a folder of its own, "
                          "such as models/merged")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {out}: exists and is not empty; nothing is deleted that this command did not "
                          "write: choose a new folder, or pass --overwrite to replace this one")
    return target


def check_file_destination(out: str | Path, *, flag: str, overwrite: bool, reads: dict[str, str | Path]) -> Path:
    """The resolved file to write for `flag PATH`, or a ConfigError saying why not. Nothing is written."""
    target = Path(out).expanduser().resolve()
    why = refusal(target, protected_paths(reads))
    if why is not None:
        raise ConfigError(f"{flag} {out}: refused, even with --overwrite: {why}; write a file of its own, "
                          "such as models/model.gguf")
    if target.is_dir():
        raise ConfigError(f"{flag} {out}: is a folder; give the path of the file to write")
    if target.exists() and not overwrite:
        raise ConfigError(f"{flag} {out}: exists; nothing is deleted that this command did not write: choose a "
                          "new path, or pass --overwrite to replace this file")
    return target


def default_modes() -> tuple[int, int]:
    """(folder, file) permissions a new folder and file get under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask, 0o666 & ~mask


def normal_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the umask gives new files.

    Libraries write some files private (save_pretrained's model.safetensors is
    0600), and the temporary folder is created private: a model folder is
    shared like any other.
    """
    dir_mode, file_mode = default_modes()
    for path in (folder, *(folder.rglob("*") if folder.is_dir() else ())):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


@contextlib.contextmanager
def new_folder(target: Path, *, is_dir: bool = True) -> Iterator[Path]:
    """A temporary sibling of `target`, renamed into place on success with normal permissions.

    On any failure it vanishes, `target` (if it existed) stays as it was, and
    the parent folders this created are removed again. With `is_dir=False`
    the same for a file.
    """
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        with atomic_path(target, is_dir=is_dir) as tmp:
            yield tmp
            normal_permissions(tmp)
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
