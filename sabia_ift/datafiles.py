"""Reading the data files people bring: json, jsonl, csv and parquet (json, jsonl and csv may be gzipped).

The fetch stage and the benchmark's task files both read through here, so they
accept the same files and refuse the same ones with the same one line: the
file, the row (JSON Lines: the physical line) and what is wrong. Records
stream one at a time, a JSON list element by element, so a file of any size
is read in the memory of its largest row.

Text is UTF-8; a leading BOM (Excel writes one) is skipped. In a JSON list or
a CSV file, invalid UTF-8 bytes survive as lone surrogates (surrogateescape),
so the caller names the row and field that hold them; JSON Lines names the
line at once. A UTF-16 or UTF-32 file is refused with its encoding named.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import DataError

# Suffix -> format, for files whose format is not declared.
TABLE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Compressed or archive files named like plain data: what their first bytes say.
_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
          b"\x28\xb5\x2f\xfd": "zstd"}
_BOM = b"\xef\xbb\xbf"
# UTF-16 and UTF-32 text: by byte-order mark, or (RFC 4627) by where the NUL bytes of the
# first two characters fall, ASCII as they are in any json, jsonl or csv file. UTF-32 LE first:
# its mark begins with UTF-16 LE's.
_WIDE_MARKS = ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
               (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"))
_WIDE_NULS: dict[tuple[bool, ...], str] = {
    (True, True, True, False): "UTF-32 (big-endian)", (False, True, True, True): "UTF-32 (little-endian)",
    (True, False, True, False): "UTF-16 (big-endian)", (False, True, False, True): "UTF-16 (little-endian)"}
_CHUNK = 1 << 20
# Lone surrogates: what surrogateescape makes of invalid UTF-8 bytes, or a bad \\udXXX JSON escape.
SURROGATE = re.compile(r"[\ud800-\udfff]")
_JSON_SPACE = " \t\n\r"  # json's own whitespace; str.isspace() knows more
_NUMBER_CHARS = "0123456789.eE+-"


def is_gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def suffix_format(path: Path, formats: Mapping[str, str] = TABLE_FORMATS) -> str | None:
    """The format a file's suffix names, looking past a `.gz`; None when it names none."""
    suffix = Path(path.stem).suffix if is_gzipped(path) else path.suffix
    return formats.get(suffix.lower())


def row_unit(file_format: str) -> str:
    """What a record's number counts in messages: JSON Lines rows are named by their physical line,
    which an editor or `sed -n Np` finds, blank lines and all; other formats count rows."""
    return "line" if file_format == "jsonl" else "row"


def check_readable(path: Path, key: str) -> None:
    """One clear line for a path that names no readable data file; `key` is the params key that named it."""
    if not path.exists():
        raise DataError(f"{path}: no such data file ({key})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; {key} must name a data file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a device, pipe or socket); {key} must name a data file")


def cannot_read(path: Path, exc: OSError, key: str) -> DataError:
    return DataError(f"{path}: cannot be read: {exc.strerror or exc} ({key})")


def _check_compression(path: Path, file_format: str, key: str) -> None:
    """A compressed file named as plain text is named for what it is, not as invalid UTF-8."""
    if file_format == "parquet" or is_gzipped(path):
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise cannot_read(path, exc, key) from None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            hint = f"; name it {path.name}.gz to read it as is" if kind == "gzip" else "; decompress it first"
            raise DataError(f"{path}: is a {kind}-compressed file, not plain {file_format} text{hint}")


def _wide_encoding(head: bytes) -> str | None:
    for mark, name in _WIDE_MARKS:
        if head.startswith(mark):
            return name
    return _WIDE_NULS.get(tuple(byte == 0 for byte in head[:4])) if len(head) >= 4 else None


@contextlib.contextmanager
def open_bytes(path: Path) -> Iterator[Any]:
    """The file's bytes, decompressed when it ends in .gz; a damaged archive is a DataError."""
    try:
        with gzip.open(path, "rb") if is_gzipped(path) else path.open("rb") as fh:
            yield fh
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({str(exc) or type(exc).__name__})") from None


@contextlib.contextmanager
def _open_utf8(path: Path) -> Iterator[Any]:
    """open_bytes for UTF-8 text: UTF-16 or UTF-32 text is named as such, not as invalid UTF-8."""
    with open_bytes(path) as fh:
        wide = _wide_encoding(fh.peek(4)[:4])
        if wide:
            raise DataError(f"{path}: file is {wide}, not UTF-8; save it as UTF-8")
        yield fh


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    """The file as text without a leading BOM, line endings untouched (csv and json positions need them)."""
    with _open_utf8(path) as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {line}: invalid UTF-8 at byte {exc.start} of the line") from None


def _iter_jsonl(path: Path, on_columns: Callable[[list[str]], None] | None) -> Iterator[tuple[int, Any]]:
    with _open_utf8(path) as fh:
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


def _document(text: str, path: Path, deep: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read{deep}") from None


def read_json(path: Path, key: str) -> Any:
    """A whole JSON document (the publishers' formats: a list, or an object of rows), read like every
    data file but whole, and strictly UTF-8: an invalid byte is named by its line."""
    check_readable(path, key)
    _check_compression(path, "json", key)
    try:
        with _open_utf8(path) as fh:
            raw = fh.read()
    except OSError as exc:
        raise cannot_read(path, exc, key) from None
    raw = raw[len(_BOM):] if raw.startswith(_BOM) else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, line_start = raw.count(b"\n", 0, exc.start) + 1, raw.rfind(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line}: invalid UTF-8 at byte {exc.start - line_start} of the line") from None
    return _document(text, path, "")


class _JsonList:
    """The elements of a JSON list, parsed one at a time from a text stream with json's own decoder.

    The buffer holds the text from the current element on; errors name the line and
    column json.loads would name for the whole file.
    """

    def __init__(self, stream: IO[str], path: Path) -> None:
        self.stream, self.path = stream, path
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before, self.column_before = 0, 0  # of the text already dropped from the buffer

    def more(self) -> bool:
        """Read on, at least doubling what the buffer holds ahead (an element longer than a chunk
        would otherwise be parsed again per chunk); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.stream.read(max(_CHUNK, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def drop_read(self) -> None:
        if self.pos < _CHUNK:
            return
        done = self.buf[:self.pos]
        newlines = done.count("\n")
        if newlines:
            self.lines_before += newlines
            self.column_before = len(done) - done.rfind("\n") - 1
        else:
            self.column_before += len(done)
        self.buf, self.pos = self.buf[self.pos:], 0

    def skip_space(self) -> str:
        """The next character that is not JSON whitespace, or '' at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _JSON_SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def error(self, message: str, at: int) -> DataError:
        newlines = self.buf.count("\n", 0, at)
        line = self.lines_before + newlines + 1
        column = at - self.buf.rfind("\n", 0, at) if newlines else self.column_before + at + 1
        return DataError(f"{self.path}: not valid JSON at line {line}, column {column}: {message}")

    def element(self, decoder: json.JSONDecoder, row: int) -> Any:
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Cut short by the buffer, or wrong: only the rest of the file tells.
                if self.more():
                    continue
                raise self.error(exc.msg, exc.pos) from None
            except RecursionError:
                raise DataError(f"{self.path}: row {row}: JSON nested too deeply to read") from None
            # A number may go on in the next chunk ("1" of "12", "0." of "0.5"): only a character
            # that cannot belong to one ends it.
            tail = end
            while tail < len(self.buf) and self.buf[tail] in _NUMBER_CHARS:
                tail += 1
            if tail == len(self.buf) and self.more():
                continue
            self.pos = end
            return value


def _iter_json(path: Path, on_columns: Callable[[list[str]], None] | None) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON list, streamed. Anything else is read whole, for the same message json.loads gives."""
    with _open_text(path) as stream:
        doc = _JsonList(stream, path)
        first = doc.skip_space()
        if first != "[":
            text = doc.buf + stream.read()
            if not text.strip():
                return
            data = _document(text, path, "; expected a list of row objects")
            raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        doc.pos += 1
        decoder = json.JSONDecoder()
        row = 0
        if doc.skip_space() != "]":
            while True:
                row += 1
                yield row, doc.element(decoder, row)
                doc.drop_read()
                after = doc.skip_space()
                if after == ",":
                    doc.pos += 1
                    doc.skip_space()
                    continue
                if after != "]":
                    raise doc.error("Expecting ',' delimiter", doc.pos)
                break
        doc.pos += 1
        if doc.skip_space():
            raise doc.error("Extra data", doc.pos)


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


def _iter_csv(path: Path, on_columns: Callable[[list[str]], None] | None) -> Iterator[tuple[int, Any]]:
    _raise_csv_field_limit()
    with _open_text(path) as text:
        reader = csv.DictReader(text, strict=True)
        row = 0  # data rows after the header, 1-based
        header = None
        try:
            header = reader.fieldnames or []
            if header and on_columns is not None:
                on_columns(list(header))
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


def _iter_parquet(path: Path, on_columns: Callable[[list[str]], None] | None) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError(f"{path}: not a readable parquet file: {exc}")

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        error: Exception = exc
        # read_table's message names the file as pyarrow users know it; it fails the same way.
        try:
            pq.read_table(path)
        except (pa.ArrowException, OSError) as again:
            error = again
        raise unreadable(error) from None
    if on_columns is not None:
        on_columns(parquet.schema_arrow.names)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from None


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}


def iter_records(path: Path, file_format: str, *, key: str,
                 on_columns: Callable[[list[str]], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, record) for each record of a json (a list), jsonl, csv or parquet file, streamed.

    Records are as the file holds them (a JSON row may be any value); numbers are
    1-based and count what row_unit(file_format) says. `on_columns`, when given,
    sees a csv header or a parquet file's column names before any record. Anything
    unreadable is a DataError naming the file, and the row where there is one;
    `key` is the params key that named the file.
    """
    check_readable(path, key)
    _check_compression(path, file_format, key)
    return _guarded(_READERS[file_format](path, on_columns), path, key)


def _guarded(records: Iterator[tuple[int, Any]], path: Path, key: str) -> Iterator[tuple[int, Any]]:
    try:
        yield from records
    except OSError as exc:
        raise cannot_read(path, exc, key) from None


def iter_rows(path: Path, file_format: str, *, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """iter_records for files of row objects whose text is valid: a record that is no object, or a
    string in it that holds an invalid byte (or a lone surrogate), is a DataError naming its row and key."""
    unit = row_unit(file_format)
    for number, record in iter_records(path, file_format, key=key):
        where = f"{path}: {unit} {number}"
        if not isinstance(record, dict):
            raise not_an_object(where, record)
        for name, value in record.items():
            bad = _first_surrogate(value)
            if bad is not None:
                raise DataError(f"{where}: key {name}: not valid UTF-8 text "
                                f"(an invalid byte or a lone surrogate at character {bad + 1})")
        yield number, record


def _first_surrogate(value: Any) -> int | None:
    """Where the first lone surrogate sits in the first string (of a value's strings, nested too) that holds one."""
    todo = [value]
    while todo:  # a loop, not recursion: a value nested as deep as the JSON reader allows stays readable
        item = todo.pop()
        if isinstance(item, str):
            bad = SURROGATE.search(item)
            if bad:
                return bad.start()
        elif isinstance(item, dict):
            todo.extend(reversed([*item.keys(), *item.values()]))
        elif isinstance(item, list):
            todo.extend(reversed(item))
    return None


def not_an_object(where: str, record: Any) -> DataError:
    return DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
