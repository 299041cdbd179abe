"""`dvc repro` end to end in a fresh copy of the project, on the embedded default."""

import json
import re
import sys

import pytest
import yaml

from conftest import FAST_PARAMS, make_project, run, write_params

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def default_project(tmp_path_factory):
    """The default params, untouched: what a new user's first `dvc repro` does."""
    project = make_project(tmp_path_factory.mktemp("default") / "sabia-ift")
    result = run(["dvc", "repro"], project, timeout=2700)  # the whole default pipeline, beside another worker
    assert ran_stages(result.stdout) == {"base", "fetch", "format", "contamination", "tokenize", "train", "evaluate",
                                           "benchmark"}
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


SECRET = "hf_TestTokenThatMustNeverBeWritten"


@pytest.fixture(scope="module")
def small_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("small") / "sabia-ift", FAST_PARAMS)
    run(["dvc", "repro"], project, env={"HF_TOKEN": SECRET})
    return project


def committed_metrics(project) -> dict:
    """Everything under metrics/ (committed to git), byte for byte: timings live elsewhere."""
    return {str(path.relative_to(project)): path.read_text()
            for path in sorted((project / "metrics").rglob("*")) if path.is_file()}


def test_token_from_the_environment_is_never_written(small_project):
    for path in small_project.rglob("*"):
        if path.is_file() and ".git" not in path.parts and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path


def find_experiment(node, name: str):
    """The `dvc exp show --json` entry of the experiment called `name`."""
    if isinstance(node, dict):
        if node.get("name") == name and node.get("data"):
            return node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = find_experiment(child, name)
            if found:
                return found
    return None


def test_run_preset_is_an_experiment_that_leaves_the_workspace_on_the_default(small_project):
    p = small_project
    run(["dvc", "repro"], p)
    (p / "presets" / "short-answers.yaml").write_text("evaluate:\n  max_new_tokens: 8\n")
    run(["git", "add", "-A"], p)
    run(["git", "commit", "-qm", "results and a preset"], p)
    before = (p / "params.yaml").read_bytes()

    result = run([sys.executable, "-m", "sabia_ift.cli", "run-preset", "short-answers"], p)
    assert ran_stages(result.stdout + result.stderr) == {"evaluate"}
    assert (p / "params.yaml").read_bytes() == before
    assert run(["git", "status", "--porcelain"], p).stdout == ""
    exp = find_experiment(json.loads(run(["dvc", "exp", "show", "--json"], p).stdout), "short-answers")
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["evaluate"]["max_new_tokens"] == 8
    assert params["train"] == yaml.safe_load(before)["train"]


def test_whole_pipeline_twice_gives_identical_metrics(small_project):
    first = committed_metrics(small_project)
    assert json.loads((small_project / "logs/train-timings.json").read_text())["runtime_s"] > 0
    assert {"metrics/eval.json", "metrics/train.json", "metrics/format.json", "metrics/tokenize.json"} <= set(first)
    run(["dvc", "repro", "--force"], small_project)
    assert committed_metrics(small_project) == first


def test_changing_lr_reruns_only_train_and_what_reads_the_adapter(small_project):
    write_params(small_project, {"train": {"lr": 0.001}})
    result = run(["dvc", "repro"], small_project)
    assert ran_stages(result.stdout) == {"train", "evaluate", "benchmark"}


def test_a_code_change_reruns_its_stage_and_stops_where_outputs_match(small_project):
    sources = small_project / "sabia_ift" / "data" / "sources.py"  # imported by the fetch stage alone
    sources.write_text(sources.read_text() + "\n# a comment is still a change to a dependency\n")
    result = run(["dvc", "repro"], small_project)
    # fetch reruns; its outputs come out byte-identical, so nothing downstream has to.
    assert ran_stages(result.stdout) == {"fetch"}


def test_a_failing_stage_leaves_no_output(small_project):
    write_params(small_project, {"format": {"test_size": 100000}})
    result = run(["dvc", "repro", "format"], small_project, check=False)
    assert result.returncode != 0
    assert "format.val_size (24) + format.test_size (100000) leave no training rows" in result.stderr + result.stdout
    assert not (small_project / "data/formatted").exists()
    write_params(small_project, {"format": FAST_PARAMS["format"]})


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
