"""Fetch stage: read instruction rows from a local file or a pinned Hub dataset.

Rows come out as {instruction, input, output, source_row}, where source_row is
the 1-based row in the source, so every later complaint can point back to it.
Structural problems (bad JSON, invalid UTF-8, a missing or non-string field)
stop the run here with the file and row named; content problems (empty
fields, duplicates) are the format stage's to count.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import random
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts import RAW_MANIFEST, RAW_ROWS
from ..config import ColumnMap, FetchConfig, is_commit_sha
from ..errors import ConfigError, DataError, hub_errors
from ..io import atomic_path, sha256_file, write_json, write_jsonl

FIELDS = ("instruction", "input", "output")
log = logging.getLogger(__name__)


def is_gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def detect_format(path: Path, declared: str) -> str:
    """The file's format: declared, or from its suffix (before a `.gz`, which means gzip)."""
    gz = is_gzipped(path)
    if gz and (declared == "parquet" or Path(path.stem).suffix.lower() == ".parquet"):
        raise ConfigError(f"fetch.path: {path}: parquet compresses its own data; read it without gzip")
    if declared != "auto":
        return declared
    suffix = Path(path.stem).suffix.lower() if gz else path.suffix.lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise ConfigError(
            f"fetch.file_format: cannot tell the format of {path} from its suffix; "
            "set it to json, jsonl, csv or parquet"
        )
    return formats[suffix]


# Compressed or archive files named like plain data: what their first bytes say.
_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
          b"\x28\xb5\x2f\xfd": "zstd"}


def _check_readable(path: Path) -> None:
    """One clear line for a path that names no readable data file."""
    if not path.exists():
        raise DataError(f"{path}: no such data file (fetch.path)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; fetch.path must name a data file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a device, pipe or socket); fetch.path must name a data file")


def _check_compression(path: Path, fmt: str) -> None:
    """A compressed file named as plain text is named for what it is, not as invalid UTF-8."""
    if fmt == "parquet" or is_gzipped(path):
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc} (fetch.path)") from None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            hint = f"; name it {path.name}.gz to read it as is" if kind == "gzip" else "; decompress it first"
            raise DataError(f"{path}: is a {kind}-compressed file, not plain {fmt} text{hint}")


@contextlib.contextmanager
def _open_bytes(path: Path):
    """The file's bytes, decompressed when it ends in .gz; a damaged archive is a DataError."""
    fh = gzip.open(path, "rb") if is_gzipped(path) else path.open("rb")
    try:
        with fh:
            yield fh
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({str(exc) or type(exc).__name__})") from None


_BOM = b"\xef\xbb\xbf"
# Lone surrogates: what surrogateescape makes of invalid UTF-8 bytes, or a bad \\udXXX JSON escape.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {line}: invalid UTF-8 at byte {exc.start} of the line") from None


def _read_text(path: Path) -> str:
    """A whole file as text, without a leading BOM (Excel writes one).

    Invalid UTF-8 bytes survive as lone surrogates (surrogateescape), so the
    row that holds them is named by normalize_record rather than the file as a whole.
    """
    with _open_bytes(path) as fh:
        raw = fh.read()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    return raw.decode("utf-8", errors="surrogateescape")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line: JSON Lines rows are named by
    their physical line, which an editor or `sed -n Np` finds, blank lines and all."""
    with _open_bytes(path) as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            line = _decode(raw, path, line_no)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = " (the line looks truncated)" if not raw.endswith(b"\n") else ""
                raise DataError(f"{path}: line {line_no}: not valid JSON{hint}: {exc.msg}") from None
            except RecursionError:
                raise DataError(f"{path}: line {line_no}: JSON nested too deeply to read") from None
            yield line_no, record


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; expected a list of row objects") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _raise_csv_field_limit() -> None:
    """Python's csv refuses cells over 131,072 characters; a long context is a valid cell.

    The largest limit the platform's C long holds (sys.maxsize overflows it on Windows).
    """
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _iter_csv(path: Path, columns: ColumnMap) -> Iterator[tuple[int, Any]]:
    _raise_csv_field_limit()
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    row = 0  # data rows after the header, 1-based like every source_row
    header = None
    try:
        header = reader.fieldnames or []
        if header:
            _check_columns(path, header, columns)
            repeated = sorted({name for name in header if header.count(name) > 1
                               and name in columns.model_dump().values()})
            if repeated:
                raise DataError(f"{path}: the header repeats column {repeated[0]!r}; "
                                "a mapped column must appear once")
        for record in reader:
            row += 1
            if None in record:
                raise DataError(f"{path}: row {row}: more fields than the header has columns")
            if any(value is None for value in record.values()):
                raise DataError(f"{path}: row {row}: fewer fields than the header has columns")
            yield row, record
    except csv.Error as exc:
        where = "header" if header is None else f"row {row + 1}"
        raise DataError(f"{path}: {where}: CSV error: {exc}") from None


def _iter_parquet(path: Path, columns: ColumnMap) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    _check_columns(path, table.column_names, columns)
    yield from enumerate(table.to_pylist(), start=1)


def _check_columns(path: Path | str, available: Iterable[str], columns: ColumnMap) -> None:
    available = list(available)
    for field in FIELDS:
        name = getattr(columns, field)
        if name is not None and name not in available:
            raise DataError(
                f"{path}: fetch.columns.{field} names column {name!r}, which the data lacks; "
                f"its columns are {', '.join(map(repr, available)) or 'none'}"
            )


def _kind(value: Any) -> str:
    """A value's type as the data file spells it (JSON null, number, ...), with the value if short."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown})" if len(shown) <= 40 else kind


def normalize_record(record: Any, row: int, columns: ColumnMap, where: str, unit: str = "row") -> dict[str, Any]:
    """Map one source record to {instruction, input, output}; strict on types, lenient on a missing input.

    `row` is the record's place in the source, named `unit` in messages: `line`
    for JSON Lines (the physical line), `row` elsewhere (1-based data rows).
    """
    at = f"{where}: {unit} {row}"
    if not isinstance(record, dict):
        raise DataError(f"{at}: expected an object with fields, got {type(record).__name__}")
    out: dict[str, Any] = {}
    for field in FIELDS:
        name = getattr(columns, field)
        if name is None:
            out[field] = ""
            continue
        if name not in record:
            if field == "input":
                # Alpaca rows often omit an empty input.
                out[field] = ""
                continue
            raise DataError(f"{at}: missing field {name!r} (fetch.columns.{field})")
        value = record[name]
        if value is None and field == "input":
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{at}: field {name!r} must be a string, got {_kind(value)}")
        bad = _SURROGATE.search(value)
        if bad:
            raise DataError(
                f"{at}: field {name!r} is not valid UTF-8 text "
                f"(an invalid byte or a lone surrogate at character {bad.start() + 1})"
            )
        out[field] = value
    out["source_row"] = row
    return out


def read_file(path: str | Path, file_format: str, columns: ColumnMap) -> list[dict[str, Any]]:
    path = Path(path)
    _check_readable(path)
    fmt = detect_format(path, file_format)
    _check_compression(path, fmt)
    if fmt == "jsonl":
        records = _iter_jsonl(path)
    elif fmt == "json":
        records = _iter_json(path)
    elif fmt == "csv":
        records = _iter_csv(path, columns)
    else:
        records = _iter_parquet(path, columns)
    try:
        loaded = list(records)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc} (fetch.path)") from None
    if not loaded:
        raise DataError(f"{path}: the data file holds no rows")
    name = columns.input
    if fmt in ("json", "jsonl") and name is not None:
        # A mapping that matches no row at all is a typo, not rows without input.
        if not any(isinstance(r, dict) and name in r for _, r in loaded):
            raise DataError(
                f"{path}: fetch.columns.input names column {name!r}, which no row has; "
                "set it to the right name, or to null for data without inputs"
            )
    unit = "line" if fmt == "jsonl" else "row"
    return [normalize_record(record, row, columns, str(path), unit) for row, record in loaded]


def subsample(n: int, max_rows: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset, in source order."""
    if max_rows is None or max_rows >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_rows))


def read_hub(cfg: FetchConfig) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Rows of a Hub dataset at a pinned revision; the token, if any, comes from HF_TOKEN."""
    import datasets

    commit = resolve_dataset_revision(cfg.dataset, cfg.revision)
    where = f"{cfg.dataset}@{commit[:12]}:{cfg.split}"
    try:
        ds = datasets.load_dataset(cfg.dataset, revision=commit, split=cfg.split)
    except hub_errors() as exc:
        raise DataError(
            f"dataset {cfg.dataset} at revision {commit}, split {cfg.split}, could not be loaded: "
            f"{type(exc).__name__}: {exc}. Check the network or the HF cache (HF_HUB_OFFLINE), "
            "and export HF_TOKEN for a gated dataset."
        ) from None
    _check_columns(where, ds.column_names, cfg.columns)
    keep = subsample(len(ds), cfg.max_rows, cfg.seed)
    picked = ds.select(keep)
    rows = [normalize_record(rec, i + 1, cfg.columns, where) for i, rec in zip(keep, picked)]
    return rows, len(ds), {"dataset": cfg.dataset, "revision": commit, "requested_revision": cfg.revision,
                           "split": cfg.split}


def resolve_dataset_revision(dataset: str, revision: str) -> str:
    """The commit sha to read: the pinned one, or the one a branch points at now (with a warning)."""
    if is_commit_sha(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        commit = HfApi().dataset_info(dataset, revision=revision).sha
    except hub_errors() as exc:
        raise DataError(
            f"fetch.revision: {revision!r} of dataset {dataset} could not be resolved to a commit "
            f"({type(exc).__name__}: {exc}). Offline, pin the 40-character commit sha of a cached copy."
        ) from None
    if not commit:
        raise DataError(f"fetch.revision: the Hub gave no commit for {revision!r} of dataset {dataset}")
    log.warning("fetch.revision %r is a branch; it resolved to commit %s. Pin that sha in params.yaml "
                "so later runs read the same rows.", revision, commit)
    return commit


def fetch(cfg: FetchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the fetch stage: write rows.jsonl and manifest.json into out_dir."""
    if cfg.source == "file":
        assert cfg.path is not None  # the schema requires a path for files
        rows = read_file(cfg.path, cfg.file_format, cfg.columns)
        total = len(rows)
        rows = [rows[i] for i in subsample(total, cfg.max_rows, cfg.seed)]
        origin = {"path": cfg.path, "format": detect_format(Path(cfg.path), cfg.file_format),
                  "compression": "gzip" if is_gzipped(Path(cfg.path)) else None, "sha256": sha256_file(cfg.path)}
    else:
        rows, total, origin = read_hub(cfg)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_jsonl(tmp / RAW_ROWS, rows)
        manifest = {
            "source": cfg.source,
            **origin,
            "columns": cfg.columns.model_dump(),
            "rows_in_source": total,
            "rows_written": len(rows),
            "max_rows": cfg.max_rows,
            "seed": cfg.seed,
            "rows_sha256": sha256_file(tmp / RAW_ROWS),
        }
        write_json(tmp / RAW_MANIFEST, manifest)
    return manifest
