"""Same params, same bytes: two fresh copies of the project produce identical outputs.

The pipeline part runs `dvc repro tokenize` (base, fetch, format, tokenize) in two
project copies side by side and compares what DVC recorded. The unit part checks
the two seeded choices of the data stages: fetch's max_rows subsample and
format's train/val/test split.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import FAST_PARAMS, REPO, make_project, params_for, project_env
from sabia_ift.artifacts import SPLITS
from sabia_ift.data.formatting import format_rows
from sabia_ift.data.sources import fetch
from sabia_ift.io import read_jsonl

SAMPLE = REPO / "data" / "sample" / "instructions.jsonl"
DATA_STAGES = ("base", "fetch", "format", "tokenize")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """Two fresh project copies, each after `dvc repro tokenize`.

    They sit in different folders and run with different hash seeds, so an
    absolute path or a set's iteration order leaking into an output shows up.
    One after the other: side by side, two torch processes on two cores take longer.
    """
    projects = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        project = make_project(tmp_path_factory.mktemp(name) / "project", FAST_PARAMS)
        env = {**project_env(project), "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(["dvc", "repro", "tokenize"], cwd=project, env=env, text=True,
                              capture_output=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        projects.append(project)
    return projects


def lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))


def test_repro_twice_gives_identical_outputs(two_runs):
    a, b = two_runs
    lock_a, lock_b = lock(a), lock(b)
    assert set(lock_a["stages"]) == set(DATA_STAGES)
    expected = {
        "base": {"models/base"},
        "fetch": {"data/raw"},
        "format": {"data/formatted", "metrics/format.json"},
        "tokenize": {"data/tokenized", "metrics/tokenize.json", "metrics/detail/tokenize.json"},
    }
    for stage in DATA_STAGES:
        outs_a = {o["path"]: o for o in lock_a["stages"][stage]["outs"]}
        outs_b = {o["path"]: o for o in lock_b["stages"][stage]["outs"]}
        assert set(outs_a) == expected[stage]
        for path in expected[stage]:
            assert outs_a[path]["md5"] == outs_b[path]["md5"], f"{stage}: {path} differs between two runs"
    # Deps and params were the same going in, so the whole lock must match too.
    assert lock_a == lock_b

    for rel in ("metrics/format.json", "metrics/tokenize.json", "models/base/model.safetensors",
                "data/raw/rows.jsonl", "data/raw/manifest.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two runs"
    # The runs did real work: FAST_PARAMS sizes came through.
    fmt = json.loads((a / "metrics/format.json").read_text())
    assert fmt["rows_in"] == FAST_PARAMS["fetch"]["max_rows"]
    assert (fmt["val_rows"], fmt["test_rows"]) == (FAST_PARAMS["format"]["val_size"],
                                                   FAST_PARAMS["format"]["test_size"])
    tok = json.loads((a / "metrics/tokenize.json").read_text())
    assert tok["train"]["rows"] > 0 and tok["train"]["trained_tokens"] > 0


# --- Unit level ------------------------------------------------------------------------------


def fetched(tmp_path: Path, name: str, **cfg) -> tuple[bytes, list[int]]:
    out = tmp_path / name
    fetch(params_for("fetch", path=str(SAMPLE), **cfg), out)
    rows = read_jsonl(out / "rows.jsonl")
    return (out / "rows.jsonl").read_bytes(), [r["source_row"] for r in rows]


def test_fetch_subsample_is_seeded(tmp_path):
    first, rows = fetched(tmp_path, "a", max_rows=50, seed=7)
    again, _ = fetched(tmp_path, "b", max_rows=50, seed=7)
    other, other_rows = fetched(tmp_path, "c", max_rows=50, seed=8)
    assert first == again
    assert len(rows) == 50 == len(set(rows))
    assert rows == sorted(rows)  # source order is kept
    assert other != first and set(other_rows) != set(rows)
    # Without max_rows every row comes through, in order.
    _, all_rows = fetched(tmp_path, "all", seed=7)
    assert all_rows == list(range(1, len(all_rows) + 1))
    assert set(rows) <= set(all_rows)


def source_rows(folder: Path, split: str) -> list[int]:
    return [r["source_row"] for r in read_jsonl(folder / f"{split}.jsonl")]


def test_format_split_is_seeded_disjoint_and_complete(tmp_path):
    fetch(params_for("fetch", path=str(SAMPLE)), tmp_path / "raw")
    cfg = params_for("format", val_size=60, test_size=0.1, seed=3)
    counts = format_rows(cfg, tmp_path / "raw", tmp_path / "a")
    format_rows(cfg, tmp_path / "raw", tmp_path / "b")
    format_rows(cfg.model_copy(update={"seed": 4}), tmp_path / "raw", tmp_path / "c")

    for split in (*SPLITS, "dropped"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    splits = {split: source_rows(tmp_path / "a", split) for split in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [counts["train_rows"], 60, round(0.1 * counts["rows_out"])]
    seen = [row for split in SPLITS for row in splits[split]]
    assert len(seen) == len(set(seen)), "a row is in two splits"
    dropped = {r["source_row"] for r in read_jsonl(tmp_path / "a" / "dropped.jsonl")}
    all_rows = {r["source_row"] for r in read_jsonl(tmp_path / "raw" / "rows.jsonl")}
    assert dropped and not dropped & set(seen)  # the sample plants defects; none reach a split
    assert set(seen) | dropped == all_rows and counts["rows_out"] == len(seen)
    for split in SPLITS:
        assert splits[split] == sorted(splits[split])  # each split keeps source order
    # Another seed: the same rows kept, split another way.
    other = {split: source_rows(tmp_path / "c", split) for split in SPLITS}
    assert set().union(*other.values()) == set(seen)
    assert other["test"] != splits["test"] and other["val"] != splits["val"]
