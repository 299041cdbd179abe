"""`dvc repro` end to end in a fresh copy of the project, on the embedded default: the suite's one full run.

What DVC reruns after a change is checked on the smaller shared build (test_reruns.py).
"""

import json

import pytest

from conftest import make_project, ran_stages, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_project(tmp_path_factory):
    """The default params, untouched: what a new user's first `dvc repro` does."""
    project = make_project(tmp_path_factory.mktemp("default") / "sabia-ift")
    result = run(["dvc", "repro"], project, timeout=2700)  # the whole default pipeline, beside another worker
    assert ran_stages(result.stdout) == {"base", "fetch", "format", "contamination", "tokenize", "train",
                                         "evaluate_base", "evaluate", "benchmark_base", "benchmark"}
    return project


def test_default_run_writes_every_output(default_project):
    p = default_project
    for path in ("models/base/config.json", "models/base/model.safetensors", "models/base/tokenizer.json",
                 "models/base/base.json", "data/raw/rows.jsonl", "data/raw/manifest.json",
                 "data/formatted/train.jsonl", "data/formatted/val.jsonl", "data/formatted/test.jsonl",
                 "data/formatted/dropped.jsonl", "data/tokenized/dataset_dict.json",
                 "models/adapter/adapter_config.json", "models/adapter/adapter_model.safetensors",
                 "models/adapter/sabia_ift_train.json", "metrics/curves/plots/metrics/train/loss.tsv",
                 "metrics/curves/plots/metrics/eval/loss.tsv", "data/eval/samples.jsonl", "dvc.lock",
                 "metrics/detail/tokenize.json", "data/contamination/flagged.jsonl", "metrics/contamination.json"):
        assert (p / path).is_file(), path
    assert not list(p.rglob("*.tmp-*")), "temporaries left behind"

    manifest = json.loads((p / "data/raw/manifest.json").read_text())
    assert manifest["rows_in_source"] == manifest["rows_written"] == 1200
    fmt = json.loads((p / "metrics/format.json").read_text())
    # The sample's planted defects, each counted (data/sample/README.md).
    assert (fmt["dropped_empty_instruction"], fmt["dropped_empty_output"], fmt["dropped_duplicate"]) == (1, 2, 4)
    assert fmt["rows_out"] == fmt["train_rows"] + fmt["val_rows"] + fmt["test_rows"] == 1193
    tok = json.loads((p / "metrics/tokenize.json").read_text())
    assert tok["train"]["rows"] == fmt["train_rows"] and tok["train"]["trained_tokens"] > 0
    # Distributions stay out of the declared metric (dvc metrics show) and live beside it.
    assert "length" not in tok["train"]
    detail = json.loads((p / "metrics/detail/tokenize.json").read_text())
    assert detail["train"]["length"]["max"] <= detail["max_length"]

    train = json.loads((p / "metrics/train.json").read_text())
    assert train["final_train_loss"] < train["first_train_loss"]
    ev = json.loads((p / "metrics/eval.json").read_text())
    assert ev["samples"] == fmt["test_rows"]
    # The claims the README makes about the default run.
    assert ev["tuned"]["eos_stop_rate"] >= 0.9 > ev["base"]["eos_stop_rate"]
    assert ev["tuned"]["rougeL"] > ev["base"]["rougeL"]
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"]
    assert ev["delta"]["rougeL"] == pytest.approx(ev["tuned"]["rougeL"] - ev["base"]["rougeL"], abs=1e-4)
    samples = [json.loads(line) for line in (p / "data/eval/samples.jsonl").read_text().splitlines()]
    assert samples and set(samples[0]) >= {"prompt", "reference", "base", "tuned"}


def test_second_repro_runs_nothing(default_project):
    result = run(["dvc", "repro"], default_project)
    assert ran_stages(result.stdout) == set()
    assert "up to date" in run(["dvc", "status"], default_project).stdout


def test_cli_generate_answers_with_the_tuned_and_the_base_model(default_project):
    tuned = run(["sabia-ift", "generate", "Qual é a capital do estado do Ceará?", "--max-new-tokens", "48"],
                default_project)
    assert tuned.stdout.strip() and "without EOS" not in tuned.stderr  # the tuned model stops by itself
    base = run(["sabia-ift", "generate", "Qual é a capital do estado do Ceará?", "--base-model",
                "--max-new-tokens", "16"], default_project)
    assert "stopped at max_new_tokens=16 without EOS" in base.stderr  # the base never learned to stop


def test_adapter_loads_with_plain_peft(default_project, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(default_project)  # the adapter names its base as models/base, like the README says
    model = AutoPeftModelForCausalLM.from_pretrained("models/adapter")
    assert model.peft_config["default"].base_model_name_or_path == "models/base"


def test_cli_check_params(default_project, tmp_path):
    assert "all sections valid" in run(["sabia-ift", "check-params"], default_project).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text((default_project / "params.yaml").read_text().replace("lr: 0.002", "lr: -1"))
    result = run(["sabia-ift", "check-params", str(bad)], default_project, check=False)
    assert result.returncode == 2 and "train.lr: Input should be greater than 0" in result.stderr
