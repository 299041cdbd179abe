"""Fetch stage: read instruction rows from a local file or a pinned Hub dataset.

Rows come out as {instruction, input, output, source_row}, where source_row is
the 1-based row in the source, so every later complaint can point back to it.
Structural problems (bad JSON, invalid UTF-8, a missing or non-string field)
stop the run here with the file and row named; content problems (empty
fields, duplicates) are the format stage's to count. Rows stream from the
file to data/raw one at a time (sabia_ift/datafiles.py reads the file).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts import RAW_MANIFEST, RAW_ROWS
from ..config import ColumnMap, FetchConfig, is_commit_sha
from ..datafiles import (
    SURROGATE,
    check_readable,
    is_gzipped,
    iter_records,
    not_an_object,
    row_unit,
    suffix_format,
)
from ..errors import ConfigError, DataError, hub_errors
from ..io import atomic_path, sha256_file, write_json, write_jsonl

FIELDS = ("instruction", "input", "output")
log = logging.getLogger(__name__)

def detect_format(path: Path, declared: str) -> str:
    """The file's format: declared, or from its suffix (before a `.gz`, which means gzip)."""
    gz = is_gzipped(path)
    if gz and (declared == "parquet" or Path(path.stem).suffix.lower() == ".parquet"):
        raise ConfigError(f"fetch.path: {path}: parquet compresses its own data; read it without gzip")
    if declared != "auto":
        return declared
    found = suffix_format(path)
    if found is None:
        raise ConfigError(
            f"fetch.file_format: cannot tell the format of {path} from its suffix; "
            "set it to json, jsonl, csv or parquet"
        )
    return found


def _check_columns(path: Path | str, available: Iterable[str], columns: ColumnMap) -> None:
    available = list(available)
    for field in FIELDS:
        name = getattr(columns, field)
        if name is not None and name not in available:
            raise DataError(
                f"{path}: fetch.columns.{field} names column {name!r}, which the data lacks; "
                f"its columns are {', '.join(map(repr, available)) or 'none'}"
            )


def _check_header(path: Path, header: list[str], columns: ColumnMap) -> None:
    """A csv header or parquet schema must hold each mapped column, a csv header each once."""
    _check_columns(path, header, columns)
    repeated = sorted({name for name in header if header.count(name) > 1 and name in columns.model_dump().values()})
    if repeated:
        raise DataError(f"{path}: the header repeats column {repeated[0]!r}; a mapped column must appear once")


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
        raise not_an_object(at, record)
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
        bad = SURROGATE.search(value)
        if bad:
            raise DataError(
                f"{at}: field {name!r} is not valid UTF-8 text "
                f"(an invalid byte or a lone surrogate at character {bad.start() + 1})"
            )
        out[field] = value
    out["source_row"] = row
    return out


def read_file(path: str | Path, file_format: str, columns: ColumnMap) -> Iterator[dict[str, Any]]:
    """The rows of a local file, normalized, in file order, one at a time.

    A file is judged as a whole before its rows are: an unreadable file, then a
    file without rows, then an input column that no row has, and only then the
    first row with a bad field. So past a bad row the rest of the file is still
    read (not yielded), and whatever is wrong with the file as a whole is said first.
    """
    path = Path(path)
    check_readable(path, "fetch.path")
    fmt = detect_format(path, file_format)
    records = iter_records(path, fmt, key="fetch.path",
                           on_columns=lambda header: _check_header(path, header, columns))
    unit, where, name = row_unit(fmt), str(path), columns.input
    # A mapping that matches no row at all is a typo, not rows without input (csv and parquet
    # headers were checked already).
    input_seen = fmt not in ("json", "jsonl") or name is None
    seen_any = False
    first_bad: DataError | None = None
    for row, record in records:
        seen_any = True
        input_seen = input_seen or (isinstance(record, dict) and name in record)
        if first_bad is not None:
            continue
        try:
            normalized = normalize_record(record, row, columns, where, unit)
        except DataError as exc:
            first_bad = exc
            continue
        yield normalized
    if not seen_any:
        raise DataError(f"{path}: the data file holds no rows")
    if not input_seen:
        raise DataError(
            f"{path}: fetch.columns.input names column {name!r}, which no row has; "
            "set it to the right name, or to null for data without inputs"
        )
    if first_bad is not None:
        raise first_bad


def subsample(n: int, max_rows: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset, in source order."""
    if max_rows is None or max_rows >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_rows))


def read_hub(cfg: FetchConfig) -> tuple[Iterator[dict[str, Any]], int, dict[str, Any]]:
    """Rows of a Hub dataset at a pinned revision (read lazily), their number in the split, and
    where they came from; the token, if any, comes from HF_TOKEN."""
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
    rows = (normalize_record(rec, i + 1, cfg.columns, where) for i, rec in zip(keep, picked))
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


def _keep_lines(source: Path, target: Path, keep: list[int]) -> None:
    """Copy the lines of `source` at the (sorted, 0-based) indices `keep` into `target`, byte for byte."""
    wanted = iter(keep)
    nxt = next(wanted, None)
    with source.open("rb") as src, target.open("wb") as out:
        for i, line in enumerate(src):
            if i == nxt:
                out.write(line)
                nxt = next(wanted, None)
                if nxt is None:
                    break


def fetch(cfg: FetchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the fetch stage: write rows.jsonl and manifest.json into out_dir."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        if cfg.source == "file":
            assert cfg.path is not None  # the schema requires a path for files
            path = Path(cfg.path)
            # Every row goes to disk first; max_rows then picks among them, as it would from a list.
            every = tmp / f".all-{RAW_ROWS}"
            total = write_jsonl(every, read_file(path, cfg.file_format, cfg.columns))
            if cfg.max_rows is not None and cfg.max_rows < total:
                _keep_lines(every, tmp / RAW_ROWS, subsample(total, cfg.max_rows, cfg.seed))
                every.unlink()
                written = cfg.max_rows
            else:
                every.rename(tmp / RAW_ROWS)
                written = total
            origin = {"path": cfg.path, "format": detect_format(path, cfg.file_format),
                      "compression": "gzip" if is_gzipped(path) else None, "sha256": sha256_file(path)}
        else:
            rows, total, origin = read_hub(cfg)
            written = write_jsonl(tmp / RAW_ROWS, rows)
        manifest = {
            "source": cfg.source,
            **origin,
            "columns": cfg.columns.model_dump(),
            "rows_in_source": total,
            "rows_written": written,
            "max_rows": cfg.max_rows,
            "seed": cfg.seed,
            "rows_sha256": sha256_file(tmp / RAW_ROWS),
        }
        write_json(tmp / RAW_MANIFEST, manifest)
    return manifest
