"""The reader of data files (fetch and the benchmark's task files): streamed, and as strict as json.loads."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sabia_ift import datafiles
from sabia_ift.datafiles import iter_records, iter_rows, read_json
from sabia_ift.errors import DataError

KEY = "fetch.path"


def records(path, fmt="json"):
    return [record for _, record in iter_records(path, fmt, key=KEY)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, max_size=8), indent=st.sampled_from([None, 0, 2]), chunk=st.integers(1, 9))
def test_a_json_list_streams_to_what_json_loads_reads(tmp_path, monkeypatch, rows, indent, chunk):
    """Elements, numbers and strings cut by the buffer's end come out whole."""
    monkeypatch.setattr(datafiles, "_CHUNK", chunk)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert records(path) == json.loads(path.read_text(encoding="utf-8"))


BROKEN = ['[1, 2', '[1 2]', '[1,]', '[{"a": 1},\n {"a": }]\n', '[1] x', '[\n', '[1, tru]', '[1, "abc',
          '[{"a": "b\x01"}]', '[\n\n  {"a": 1}\n  {"b": 2}]', '  [1, 2]  \n  ]']


@pytest.mark.parametrize("text", BROKEN)
@pytest.mark.parametrize("chunk", [2, 5, 1 << 20])
def test_a_broken_json_list_is_named_where_json_loads_names_it(tmp_path, monkeypatch, text, chunk):
    monkeypatch.setattr(datafiles, "_CHUNK", chunk)
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    e = expected.value
    with pytest.raises(DataError) as err:
        records(path)
    assert str(err.value) == f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"


def test_a_json_list_is_read_in_the_memory_of_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "_CHUNK", 1 << 16)
    path = tmp_path / "rows.json"
    rows = [{"instruction": f"Pergunta {i}?", "output": "Resposta longa. " * 20} for i in range(20_000)]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 7_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(path, "json", key=KEY))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(rows)
    assert peak < 1_000_000


def test_a_json_element_nested_too_deeply_is_named_by_its_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"a": 1}, ' + "[" * 200_000 + "]" * 200_000 + "]")
    with pytest.raises(DataError, match=r"rows.json: row 2: JSON nested too deeply to read$"):
        records(path)


WIDE = [("utf-16", "UTF-16 (little-endian)"), ("utf-16-le", "UTF-16 (little-endian)"),
        ("utf-16-be", "UTF-16 (big-endian)"), ("utf-32", "UTF-32 (little-endian)"),
        ("utf-32-le", "UTF-32 (little-endian)"), ("utf-32-be", "UTF-32 (big-endian)")]


@pytest.mark.parametrize(("encoding", "named"), WIDE)
@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.csv", "rows.json.gz"])
def test_utf16_and_utf32_files_are_named_for_what_they_are(tmp_path, encoding, named, name):
    """With a byte-order mark (utf-16, utf-32) or without one (the -le and -be codecs)."""
    path = tmp_path / name
    fmt = datafiles.suffix_format(path)
    text = {"json": '[{"instruction": "Olá"}]', "jsonl": '{"instruction": "Olá"}\n',
            "csv": "instruction,output\nOlá,Oi\n"}[fmt]
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(DataError) as err:
        records(path, fmt)
    assert str(err.value) == f"{path}: file is {named}, not UTF-8; save it as UTF-8"


def test_rows_with_an_invalid_byte_name_the_row_and_key(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"pergunta,resposta\nQuanto \xc3\xa9 1 + 1?,2\nQuanto \xc3\xa9 2 + 2?,4\xff\n")
    with pytest.raises(DataError) as err:
        list(iter_rows(path, "csv", key=KEY))
    assert str(err.value) == (f"{path}: row 2: key resposta: not valid UTF-8 text "
                              "(an invalid byte or a lone surrogate at character 2)")
    nested = tmp_path / "rows.jsonl"
    nested.write_text('{"q": "ok", "choices": ["a", {"x": "b\\ud800"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: key choices: not valid UTF-8 text"):
        list(iter_rows(nested, "jsonl", key=KEY))


def test_a_whole_json_document_names_an_invalid_byte_by_its_line(tmp_path):
    path = tmp_path / "enem.json"
    path.write_bytes(b'{"data": [\n  {"q": "Qu\xe9?"}\n]}\n')
    with pytest.raises(DataError) as err:
        read_json(path, "benchmark.tasks.0.path")
    assert str(err.value) == f"{path}: line 2: invalid UTF-8 at byte 11 of the line"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"data": [{"q": "Qué?"}]}, ensure_ascii=False).encode())
    assert read_json(path, "benchmark.tasks.0.path") == {"data": [{"q": "Qué?"}]}
