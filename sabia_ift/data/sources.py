"""Fetch stage: read instruction rows from a local file or a pinned Hub dataset.

Rows come out as {instruction, input, output, source_row}, where source_row is
the 1-based row in the source, so every later complaint can point back to it.
Structural problems (bad JSON, invalid UTF-8, a missing or non-string field)
stop the run here with the file and row named; content problems (empty
fields, duplicates) are the format stage's to count.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts import RAW_MANIFEST, RAW_ROWS
from ..config import ColumnMap, FetchConfig, is_commit_sha
from ..errors import ConfigError, DataError, hub_errors
from ..io import atomic_path, sha256_file, write_json, write_jsonl

FIELDS = ("instruction", "input", "output")
log = logging.getLogger(__name__)


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise ConfigError(
            f"fetch.file_format: cannot tell the format of {path} from its suffix; "
            "set it to json, jsonl, csv or parquet"
        )
    return formats[suffix]


_BOM = b"\xef\xbb\xbf"
# Lone surrogates: what surrogateescape makes of invalid UTF-8 bytes, or a bad \\udXXX JSON escape.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _decode(raw: bytes, path: Path, row: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: row {row}: invalid UTF-8 at byte {exc.start} of the line") from None


def _read_text(path: Path) -> str:
    """A whole file as text, without a leading BOM (Excel writes one).

    Invalid UTF-8 bytes survive as lone surrogates (surrogateescape), so the
    row that holds them is named by normalize_record rather than the file as a whole.
    """
    raw = path.read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    return raw.decode("utf-8", errors="surrogateescape")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        row = 0
        for raw in fh:
            if row == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            row += 1
            line = _decode(raw, path, row)
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError as exc:
                hint = " (the line looks truncated)" if not raw.endswith(b"\n") else ""
                raise DataError(f"{path}: row {row}: not valid JSON{hint}: {exc.msg}") from None


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _iter_csv(path: Path, columns: ColumnMap) -> Iterator[tuple[int, Any]]:
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


def normalize_record(record: Any, row: int, columns: ColumnMap, where: str) -> dict[str, Any]:
    """Map one source record to {instruction, input, output}; strict on types, lenient on a missing input."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: row {row}: expected an object with fields, got {type(record).__name__}")
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
            raise DataError(f"{where}: row {row}: missing field {name!r} (fetch.columns.{field})")
        value = record[name]
        if value is None and field == "input":
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: row {row}: field {name!r} must be a string, got {_kind(value)}")
        bad = _SURROGATE.search(value)
        if bad:
            raise DataError(
                f"{where}: row {row}: field {name!r} is not valid UTF-8 text "
                f"(an invalid byte or a lone surrogate at character {bad.start() + 1})"
            )
        out[field] = value
    out["source_row"] = row
    return out


def read_file(path: str | Path, file_format: str, columns: ColumnMap) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (fetch.path)")
    fmt = detect_format(path, file_format)
    if fmt == "jsonl":
        records = _iter_jsonl(path)
    elif fmt == "json":
        records = _iter_json(path)
    elif fmt == "csv":
        records = _iter_csv(path, columns)
    else:
        records = _iter_parquet(path, columns)
    rows = list(records)
    if not rows:
        raise DataError(f"{path}: the data file holds no rows")
    name = columns.input
    if fmt in ("json", "jsonl") and name is not None:
        # A mapping that matches no row at all is a typo, not rows without input.
        if not any(isinstance(r, dict) and name in r for _, r in rows):
            raise DataError(
                f"{path}: fetch.columns.input names column {name!r}, which no row has; "
                "set it to the right name, or to null for data without inputs"
            )
    return [normalize_record(record, row, columns, str(path)) for row, record in rows]


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
        rows = read_file(cfg.path, cfg.file_format, cfg.columns)
        total = len(rows)
        rows = [rows[i] for i in subsample(total, cfg.max_rows, cfg.seed)]
        origin = {"path": cfg.path, "format": detect_format(Path(cfg.path), cfg.file_format),
                  "sha256": sha256_file(cfg.path)}
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
