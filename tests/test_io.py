"""Atomic outputs: a failed write leaves the old output, or nothing, never half of one."""

import pytest

from sabia_ift.errors import DataError
from sabia_ift.io import atomic_path, read_jsonl, write_json, write_jsonl


def test_failed_folder_write_leaves_the_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("half of the second")
        raise RuntimeError("killed midway")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_failed_file_write_leaves_nothing(tmp_path):
    def rows():
        yield {"a": 1}
        raise RuntimeError("the generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "rows.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_round_trip_and_clear_errors(tmp_path):
    write_json(tmp_path / "m.json", {"não": 1})
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == '{\n  "não": 1\n}\n'
    write_jsonl(tmp_path / "r.jsonl", [{"x": "ç"}, {"x": "ã"}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"x": "ç"}, {"x": "ã"}]
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(DataError, match="bad.jsonl: row 2"):
        read_jsonl(tmp_path / "bad.jsonl")
