"""What `dvc repro` reruns, writes and keeps on the shared FAST_PARAMS build (conftest.built_project).

Apart from test_pipeline.py (the one full run of the default params), so pytest-xdist can run
the two on different workers: `--dist loadscope` keeps a module on one worker.
"""

import json
import sys

import pytest
import yaml

from conftest import FAST_PARAMS, SECRET, copy_project, ran_stages, run, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_project(built_project, tmp_path_factory):
    """FAST_PARAMS after `dvc repro` with HF_TOKEN=SECRET (conftest.built_project), a copy to change."""
    return copy_project(built_project, tmp_path_factory.mktemp("small") / "sabia-ift")


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
    # The base's generations depend on evaluate's params too: both halves rerun, nothing else.
    assert ran_stages(result.stdout + result.stderr) == {"evaluate_base", "evaluate"}
    assert (p / "params.yaml").read_bytes() == before
    assert run(["git", "status", "--porcelain"], p).stdout == ""
    exp = find_experiment(json.loads(run(["dvc", "exp", "show", "--json"], p).stdout), "short-answers")
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["evaluate"]["max_new_tokens"] == 8
    assert params["train"] == yaml.safe_load(before)["train"]


# test_determinism.py: the whole pipeline twice (two CPU settings) gives identical metrics.


def shape(obj):
    """A JSON value's keys, nested, without its numbers."""
    if isinstance(obj, dict):
        return {key: shape(value) for key, value in obj.items()}
    return type(obj).__name__ if obj is None or isinstance(obj, (bool, str, list)) else "number"


def test_changing_lr_reruns_only_train_and_what_reads_the_adapter(small_project):
    """The base model's generations and benchmark answers come from DVC's cache, and the metrics
    files keep their base/tuned/delta shape (dvc metrics diff and the report read them as before)."""
    before = {name: json.loads((small_project / name).read_text())
              for name in ("metrics/eval.json", "metrics/benchmarks.json")}
    write_params(small_project, {"train": {"lr": 0.001}})
    dry = run(["dvc", "repro", "--dry"], small_project)
    # A dry run does not train, so DVC cannot see the adapter change yet and lists train alone;
    # what matters here is that no base stage is in it.
    assert ran_stages(dry.stdout) == {"train"}
    result = run(["dvc", "repro"], small_project)
    assert ran_stages(result.stdout) == {"train", "evaluate", "benchmark"}
    for name, old in before.items():
        new = json.loads((small_project / name).read_text())
        assert shape(new) == shape(old), name
    ev = json.loads((small_project / "metrics/eval.json").read_text())
    assert ev["base"] == before["metrics/eval.json"]["base"] and ev["tuned"] != before["metrics/eval.json"]["tuned"]
    assert set(ev) >= {"base", "tuned", "delta"}
    for task in json.loads((small_project / "metrics/benchmarks.json").read_text()).values():
        assert set(task) >= {"base", "tuned", "delta", "ci95", "p_value", "significant"}
    prompts = [json.loads(line) for line in (small_project / "metrics/eval_prompts.jsonl").read_text().splitlines()]
    assert prompts and all(set(p) == {"source_row", "prompt_sha1", "base", "tuned"} for p in prompts)


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
