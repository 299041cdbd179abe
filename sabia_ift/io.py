"""Atomic writes: an output exists only once it is complete.

A stage killed mid-write must not leave a file or folder that the next stage,
or a person, would take as finished. Everything is written to a temporary
sibling and renamed into place at the end; rename is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError, OutputError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what an earlier write of `target` left when it was killed (SIGKILL skips cleanup).

    Only this target's own temporaries go: `.{name}.tmp-XXXXXXXX` and
    `.{name}.old-XXXXXXXX` with tempfile's 8-character suffix, never another
    target's (`.raw.tmp-*` is not `.raw.tmp-x.tmp-*`'s).
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    removed = []
    if target.parent.is_dir():
        for sibling in target.parent.iterdir():
            if pattern.fullmatch(sibling.name):
                _remove(sibling)
                removed.append(sibling)
    return removed


# The machine refusing a write: no permission, a read-only file system, a full disk or quota.
REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
# ...or a file where a folder should be.
WRITE_ERRNOS = REFUSED | {errno.ENOTDIR, errno.EEXIST}
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}")


def cannot_write(target: Path, exc: OSError) -> OutputError:
    """One line for a failed write of `target`: the path and what the system refused."""
    blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None and blocker != target:
        return OutputError(f"{target}: cannot be written: {blocker} is a file, not a folder")
    folder = next((p for p in target.parents if p.is_dir()), target.parent)
    return OutputError(f"{target}: cannot be written: {exc.strerror or exc} in folder {folder}")


def _write_failure(exc: OSError, target: Path, tmp: Path | None) -> bool:
    """Whether `exc` is the system refusing this write of `target`, to be reported by cannot_write.

    Errors about other files (an input read while writing) stay as they are, and
    a write nested in another one's temporary folder leaves the report to the
    outer write, which names the output a user knows.
    """
    if exc.errno not in WRITE_ERRNOS or any(_TEMPORARY.fullmatch(part.name) for part in target.parents):
        return False
    if exc.filename is None:  # write() on a full disk names no file
        return True
    path, target = Path(os.fsdecode(exc.filename)).absolute(), target.absolute()
    ours = [target] if tmp is None else [target, tmp.absolute()]
    return (path in target.parents  # a folder to create on the way
            or any(path == p or p in path.parents for p in ours)
            or (path.parent == target.parent and path.name.startswith(f".{target.name}.")))  # a temporary


@contextlib.contextmanager
def atomic_path(target: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `target`, on error it vanishes.

    A write the system refuses (permission, read-only file system, full disk)
    is an OutputError naming `target`, for every stage alike.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        prefix = f".{target.name}.tmp-"
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are shared like any folder
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        if tmp is not None:
            _remove(tmp)
        if _write_failure(exc, target, None):
            raise cannot_write(target, exc) from None
        raise
    try:
        yield tmp
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only or full disk, the next write removes it
            _remove(tmp)
        if isinstance(exc, OSError) and _write_failure(exc, target, tmp):
            raise cannot_write(target, exc) from None
        raise
    try:
        _replace(tmp, target, is_dir)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if _write_failure(exc, target, tmp):
            raise cannot_write(target, exc) from None
        raise


def _replace(tmp: Path, target: Path, is_dir: bool) -> None:
    if is_dir:
        # A folder cannot be renamed over a non-empty folder: move the old one
        # aside first so the target is never half old, half new.
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # the previous output, not nothing
                os.replace(old, target)
            raise
        if old is not None:
            _remove(old)
    else:
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinity replaced by None.

    JSON has no NaN: Python's json writes a bare `NaN` that other readers
    (jq, browsers, DVC's plots) refuse. An undefined number (a loss with no
    validation rows) is written as null instead.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(value) for value in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON that every reader accepts: never NaN or Infinity."""
    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a file an earlier stage wrote; a missing or damaged one is a DataError naming it."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a file an earlier stage wrote, one at a time; a missing or damaged file is a
    DataError naming it (and the row)."""
    path = Path(path)
    row = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    row += 1
                    yield record
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; run the stage that writes it first (dvc repro)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: row {row + 1}: not valid JSON Lines ({exc}); "
                        "rerun the stage that writes it") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
