"""Two processes (DDP over gloo, on CPU) train what one process with the same global batch trains."""

import csv
import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, deep_merge, default_params, params_for, project_env
from sabia_ift.data.formatting import clean_rows
from sabia_ift.data.tokenization import tokenize
from sabia_ift.io import write_jsonl
from sabia_ift.toy.sample import generate_rows
from sabia_ift.train.distributed import accumulation_per_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenized(tiny_base, tokenizer, tmp_path_factory):

    root = tmp_path_factory.mktemp("ddp-data")
    kept, _ = clean_rows([{**r, "source_row": i + 1} for i, r in enumerate(generate_rows(0)[:120])])
    for split, rows in (("train", kept[:96]), ("val", kept[96:112]), ("test", kept[112:])):
        write_jsonl(root / f"{split}.jsonl", rows)
    tokenize(params_for("tokenize", max_length=256), tokenizer, 2048, root, root / "tokenized")
    return root / "tokenized"


def run_stage(tmp_path, tiny_base, tokenized, name, train):
    folder = tmp_path / name
    folder.mkdir()
    params = deep_merge(default_params(), {"train": {
        "epochs": 1, "lr": 3e-3, "logging_steps": 1, "eval_steps": 100, "save_steps": 100, "device": "cpu",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, **train}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.train", "--params", str(folder / "params.yaml"), "--base", str(tiny_base),
           "--data", str(tokenized), "--out", str(folder / "adapter"), "--checkpoints", str(folder / "ckpt"),
           "--live", str(folder / "live"), "--metrics", str(folder / "train.json"),
           "--timings", str(folder / "timings.json")]
    env = {**project_env(folder), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = list(csv.DictReader((folder / "live/plots/metrics/train/loss.tsv").open(), delimiter="\t"))
    return (json.loads((folder / "train.json").read_text()), json.loads((folder / "timings.json").read_text()),
            load_file(folder / "adapter/adapter_model.safetensors"), [float(r["loss"]) for r in curve])


@pytest.mark.parametrize(("packing", "weighting"), [(False, "tokens"), (True, "tokens"), (True, "rows")],
                         ids=["padded", "packed", "packed-rows"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_base, tokenized, packing, weighting):
    # rows: each process weighs its rows by the step's rows and tokens over both processes.
    layout = {"packing": packing, "micro_batch_size": 4, "micro_batch_tokens": 600, "loss_weighting": weighting}
    one = run_stage(tmp_path, tiny_base, tokenized, "one", {**layout, "devices": 1, "grad_accum": 2})
    two = run_stage(tmp_path, tiny_base, tokenized, "two", {**layout, "devices": 2, "grad_accum": 2})
    (m1, t1, a1, c1), (m2, t2, a2, c2) = one, two
    assert t2["processes"] == 2 and t1["processes"] == 1
    assert m1["steps"] == m2["steps"] and t1["rows_seen"] == t2["rows_seen"] == 96  # nothing dropped or repeated
    assert t1["global_batch"] == {**t2["global_batch"], "micro_batches_per_process": 2, "processes": 1}
    assert c1 == pytest.approx(c2, rel=1e-4, abs=1e-4)
    for name, tensor in a1.items():
        assert (tensor - a2[name]).abs().max() < 1e-4, name


def test_a_global_batch_that_cannot_be_split_is_refused():
    from sabia_ift.errors import ConfigError

    assert accumulation_per_process(4, 2) == 2
    with pytest.raises(ConfigError, match="train.grad_accum: 3 .* over 2 processes"):
        accumulation_per_process(3, 2)
