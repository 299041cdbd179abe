"""Atomic outputs: a failed write leaves the old output, or nothing, never half of one."""

import errno
import os
from pathlib import Path

import pytest

from sabia_ift.errors import DataError, OutputError
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


# --- The system refusing a write: one line naming the output, nothing left -------------------


def test_a_file_where_the_folder_should_be_is_named(tmp_path):
    """Real, even as root: the output's folder is a file."""
    (tmp_path / "data").write_text("not a folder")
    for target in (tmp_path / "data" / "raw", tmp_path / "data" / "deeper" / "raw"):
        with pytest.raises(OutputError, match=f"{target}: cannot be written: {tmp_path / 'data'} is a file, "
                                              "not a folder"):
            write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    ("where", "code", "words"),
    [
        ("mkstemp", errno.EACCES, "Permission denied"),
        ("mkstemp", errno.EROFS, "Read-only file system"),
        ("write", errno.ENOSPC, "No space left on device"),
        ("replace", errno.EDQUOT, "quota"),
    ],
)
def test_a_refused_write_is_one_line_naming_the_output(tmp_path, monkeypatch, where, code, words):
    """Each failure raised where the system raises it: root passes permission checks, and no test fills a disk."""
    import tempfile

    target = tmp_path / "metrics" / "m.json"
    target.parent.mkdir()
    if where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", lambda prefix, dir: (_ for _ in ()).throw(
            OSError(code, os.strerror(code), os.path.join(dir, f"{prefix}abcd1234"))))
    elif where == "write":
        real_open = Path.open

        def full_disk(self, *args, **kwargs):
            handle = real_open(self, *args, **kwargs)
            if self.name.startswith(".m.json.tmp-"):
                handle.write = lambda text: (_ for _ in ()).throw(OSError(code, os.strerror(code)))
            return handle

        monkeypatch.setattr(Path, "open", full_disk)
    else:
        monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(
            OSError(code, os.strerror(code), src, None, dst)))
    with pytest.raises(OutputError) as info:
        write_jsonl(target, [{"a": 1}])
    assert str(info.value).startswith(f"{target}: cannot be written: ")
    assert words in str(info.value) and f"in folder {target.parent}" in str(info.value)
    assert list(target.parent.iterdir()) == []


def test_a_refused_folder_replace_keeps_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("first")
    real_replace = os.replace

    def refuse_new(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src, None, dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(OutputError, match="out: cannot be written: No space left"), \
            atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_nested_write_is_named_by_the_outer_output(tmp_path, monkeypatch):
    """data/raw/rows.jsonl is written inside data/.raw.tmp-*: the error names data/raw, not the temporary."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def full(prefix, dir):
        if prefix.startswith(".rows.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(dir, f"{prefix}abcd1234"))
        return real_mkstemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OutputError) as info, atomic_path(tmp_path / "raw", is_dir=True) as tmp:
        write_jsonl(tmp / "rows.jsonl", [{"a": 1}])
    assert str(info.value) == f"{tmp_path / 'raw'}: cannot be written: No space left on device in folder {tmp_path}"
    assert list(tmp_path.iterdir()) == []


def test_errors_about_other_files_are_not_blamed_on_the_output(tmp_path):
    """An input that cannot be read while an output is written stays the reader's error."""
    with pytest.raises(PermissionError), atomic_path(tmp_path / "out", is_dir=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.jsonl"))
    assert list(tmp_path.iterdir()) == []
