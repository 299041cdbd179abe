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


def test_json_outputs_are_valid_json_even_with_nan(tmp_path):
    """A bare NaN is not JSON: an undefined number is written as null."""
    import json
    import math

    write_json(tmp_path / "m.json", {"val_loss": math.nan, "x": [math.inf, -math.inf, 1.5], "ok": 2})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"val_loss": None, "x": [None, None, 1.5], "ok": 2}
    write_jsonl(tmp_path / "r.jsonl", [{"loss": math.nan}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"loss": None}]


def test_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    """What a SIGKILL left (no cleanup runs) goes at the next write of the same target, and only that."""
    for name in (".out.tmp-abc12345", ".out.old-abc_1234", ".other.tmp-abc12345", ".out.tmp-x.tmp-abc12345",
                 ".out.tmp-short"):
        (tmp_path / name).mkdir()
    (tmp_path / ".out.tmp-zzz99999").write_text("a stale file temporary")
    with atomic_path(tmp_path / "out", is_dir=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.tmp-abc12345", ".out.tmp-short", ".out.tmp-x.tmp-abc12345", "out"]


def test_damaged_file_of_a_stage_is_one_clear_error(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"x": 1}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl: row 2: not valid JSON Lines"):
        read_jsonl(tmp_path / "deep.jsonl")
