"""Same params, same bytes: two fresh copies of the project produce identical outputs.

The pipeline part runs the whole `dvc repro` in two project copies under two values of
ATEN_CPU_CAPABILITY (and of MKL's branch), as two CPUs would give: the shared build
(conftest.built_project) and a fresh copy. It compares what DVC recorded and every
committed metric. The unit part
checks that those variables do change torch's results when nothing pins them (so the
pipeline test can fail), and the two seeded choices of the data stages: fetch's
max_rows subsample and format's train/val/test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CPU_SETTINGS, FAST_PARAMS, REPO, make_project, params_for, project_env
from sabia_ift.artifacts import SPLITS
from sabia_ift.data.formatting import format_rows
from sabia_ift.data.sources import fetch
from sabia_ift.io import read_jsonl

SAMPLE = REPO / "data" / "sample" / "instructions.jsonl"
DATA_STAGES = ("base", "fetch", "format", "contamination", "tokenize")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PIPELINE_STAGES = (*DATA_STAGES, "train", "evaluate_base", "evaluate", "benchmark_base", "benchmark")


@pytest.fixture(scope="module")
def two_runs(built_project, tmp_path_factory) -> list[Path]:
    """Two fresh project copies, each after a whole `dvc repro`.

    The first is the shared build (conftest.built_project), made under CPU_SETTINGS["a"];
    the second a fresh copy under "b". They sit in different folders and run with different
    hash seeds, so an absolute path or a set's iteration order leaking into an output shows
    up, and under different CPU settings, so a kernel choice that leaks shows up too.
    """
    project = make_project(tmp_path_factory.mktemp("b") / "project", FAST_PARAMS)
    env = {**project_env(project), **CPU_SETTINGS["b"]}
    done = subprocess.run(["dvc", "repro"], cwd=project, env=env, text=True,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return [built_project, project]


def lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))


def test_repro_twice_gives_identical_outputs(two_runs):
    a, b = two_runs
    lock_a, lock_b = lock(a), lock(b)
    assert set(lock_a["stages"]) == set(lock_b["stages"]) == set(PIPELINE_STAGES)
    expected = {
        "base": {"models/base"},
        "fetch": {"data/raw"},
        "format": {"data/formatted", "metrics/format.json"},
        "contamination": {"data/contamination", "metrics/contamination.json"},
        "tokenize": {"data/tokenized", "metrics/tokenize.json", "metrics/detail/tokenize.json"},
        "train": {"models/adapter", "models/checkpoints", "metrics/curves", "metrics/train.json"},
    }
    assert set(expected) == set(DATA_STAGES) | {"train"}
    for stage in expected:
        outs_a = {o["path"]: o for o in lock_a["stages"][stage]["outs"]}
        outs_b = {o["path"]: o for o in lock_b["stages"][stage]["outs"]}
        assert set(outs_a) == expected[stage]
        for path in expected[stage]:
            assert outs_a[path]["md5"] == outs_b[path]["md5"], f"{stage}: {path} differs between two runs"
    # Deps and params were the same going in, so the whole lock must match too.
    assert lock_a == lock_b

    for rel in ("metrics/format.json", "metrics/tokenize.json", "models/base/model.safetensors",
                "data/raw/rows.jsonl", "data/raw/manifest.json", "models/adapter/adapter_model.safetensors",
                "models/adapter/adapter_config.json", "metrics/train.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two runs"
    # The runs did real work: FAST_PARAMS sizes came through.
    fmt = json.loads((a / "metrics/format.json").read_text())
    assert fmt["rows_in"] == FAST_PARAMS["fetch"]["max_rows"]
    assert (fmt["val_rows"], fmt["test_rows"]) == (FAST_PARAMS["format"]["val_size"],
                                                   FAST_PARAMS["format"]["test_size"])
    tok = json.loads((a / "metrics/tokenize.json").read_text())
    assert tok["train"]["rows"] > 0 and tok["train"]["trained_tokens"] > 0


def committed_metrics(project) -> dict:
    """Everything under metrics/ (committed to git), byte for byte: timings live elsewhere."""
    return {str(path.relative_to(project)): path.read_text()
            for path in sorted((project / "metrics").rglob("*")) if path.is_file()}


def test_whole_pipeline_twice_gives_identical_metrics(two_runs):
    a, b = two_runs
    first = committed_metrics(a)
    assert json.loads((a / "logs/train-timings.json").read_text())["runtime_s"] > 0
    assert {"metrics/eval.json", "metrics/train.json", "metrics/format.json", "metrics/tokenize.json"} <= set(first)
    assert committed_metrics(b) == first


# --- Unit level ------------------------------------------------------------------------------

# A softmax over a LLaMA vocabulary: torch's AVX2 and portable kernels sum its terms in other orders.
SOFTMAX = """
from sabia_ift import stage
import hashlib, torch
x = (torch.arange(64 * 32000) * 2654435761 % 1000003).float().reshape(64, 32000) / 50000
print(hashlib.sha256(torch.softmax(x, -1).numpy().tobytes()).hexdigest(), torch.backends.cpu.get_cpu_capability())
"""


def softmax_digest(capability: str, numerics: str) -> tuple[str, str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "SABIA_IFT_CPU_NUMERICS": numerics,
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SOFTMAX], env=env, capture_output=True, text=True, check=True)
    digest, used = done.stdout.split()
    return digest, used


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(), reason="needs a CPU with AVX2")
def test_the_cpu_settings_matter_unless_pinned():
    """Without the pins the capability changes the bits (so the pipeline test above can fail);
    with them, whatever the shell asks, the stages compute with the portable kernels."""
    native = {cap: softmax_digest(cap, "native") for cap in ("avx2", "default")}
    assert native["avx2"][1] == "AVX2" and native["default"][1] == "DEFAULT"
    assert native["avx2"][0] != native["default"][0]
    pinned = {cap: softmax_digest(cap, "pinned") for cap in ("avx2", "default")}
    assert pinned["avx2"] == pinned["default"] and pinned["avx2"][1] == "DEFAULT"


def test_a_stage_refuses_torch_loaded_before_the_pins():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    code = "import torch\nfrom sabia_ift import stage\nimport sys\nsys.exit(stage.run(lambda args: None, None))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode == 0:  # this CPU's own choice happened to be the portable one, with two threads
        pytest.skip("torch chose the pinned settings by itself here")
    assert "import sabia_ift.stage first" in done.stderr


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
