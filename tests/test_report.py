"""Experiments and the pull-request workflow, on one small copy of the project.

The copy has two commits that differ only in train.lr, each with its `dvc repro`
results committed, as a pull request would have them. Every test reads it; the
experiment tests run in DVC's temporary folders, so the workspace stays at HEAD.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST_PARAMS, make_project, run, write_params

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")
METRICS = ["metrics/format.json", "metrics/tokenize.json", "metrics/train.json", "metrics/eval.json"]
OUTPUTS = ["models/base", "data/raw", "data/formatted", "data/tokenized", "models/adapter",
           "data/eval/samples.jsonl"]
LR_HEAD = 0.004
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The definition, written out so the test checks the report, not the report's own table.
HIGHER_IS_BETTER = {"eos_stop_rate": True, "rougeL": True, "chrf": True, "exact_match": True,
                    "repetition": False, "val_loss": False, "val_perplexity": False}


def commit(project: Path, message: str) -> None:
    """What a user commits after `dvc repro`: params, lock, metrics and DVC's .gitignore entries."""
    changed = run(["git", "ls-files", "--modified", "--others", "--exclude-standard"], project).stdout.split()
    gitignores = [f for f in changed if f.endswith(".gitignore")]
    run(["git", "add", "params.yaml", "dvc.lock", "metrics", *gitignores], project)
    run(["git", "commit", "-qm", message], project)
    leftover = run(["git", "status", "--porcelain"], project).stdout
    assert not leftover, f"`dvc repro` left files neither committed nor ignored:\n{leftover}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("experiments") / "project", FAST_PARAMS)
    # The tests' private HF cache lives in the project (conftest.project_env); a user's does not.
    with open(project / ".git" / "info" / "exclude", "a", encoding="utf-8") as f:
        f.write("/hf/\n")
    run([DVC, "repro"], project)
    commit(project, "first run")
    write_params(project, {"train": {"lr": LR_HEAD}})
    run([DVC, "repro"], project)
    commit(project, "higher learning rate")
    return project


def at(project: Path, rev: str, path: str) -> str:
    return run(["git", "show", f"{rev}:{path}"], project).stdout


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def table_rows(markdown: str, width: int) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == width and cells[0] != "Path":
                rows.append(cells)
    return rows


def same(cell: str, value) -> bool:
    if value is None:
        return cell == "-"
    if isinstance(value, bool):
        return cell == str(value).lower()
    if isinstance(value, (int, float)):
        return float(cell) == pytest.approx(value, rel=1e-9, abs=1e-12)
    return cell == str(value)


def report(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sabia_ift.cli", "report", *args], project, check=False)


def images(markdown: str, report_dir: Path) -> list[Path]:
    return [report_dir / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)]


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{path}: not a real chart ({len(data)} bytes)"
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG" and min(img.size) >= 300, img.size


def test_report_numbers_are_the_metrics_files_at_each_commit(project, tmp_path):
    result = report(project, "--base", "HEAD~1", "--head", "HEAD", "--out", str(tmp_path / "pr.md"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "pr.md").read_text(encoding="utf-8")
    rows = {(r[0], r[1]): r[2:] for r in table_rows(markdown, 6)}

    for path in METRICS:
        base = flatten(json.loads(at(project, "HEAD~1", path)))
        head = flatten(json.loads(at(project, "HEAD", path)))
        assert {key for p, key in rows if p == path} == set(base) | set(head), path
        for key in set(base) | set(head):
            old, new, change, verdict = rows[(path, key)]
            assert same(old, base.get(key)), (path, key, old, base.get(key))
            assert same(new, head.get(key)), (path, key, new, head.get(key))
            if isinstance(base.get(key), (int, float)) and isinstance(head.get(key), (int, float)):
                assert float(change) == pytest.approx(head[key] - base[key], abs=1e-9), (path, key, change)
            leaf = key.rsplit(".", 1)[-1]
            if path == "metrics/eval.json" and leaf in HIGHER_IS_BETTER and head[key] != base[key]:
                expected = "better" if (head[key] > base[key]) == HIGHER_IS_BETTER[leaf] else "worse"
                assert expected in verdict, (key, verdict)
            else:
                assert verdict == "", (key, verdict)

    # Both models at both revisions, and the learning rate visibly moved the tuned one.
    for model in ("base", "tuned"):
        for metric in HIGHER_IS_BETTER:
            assert ("metrics/eval.json", f"{model}.{metric}") in rows
    assert any(float(rows[("metrics/eval.json", f"tuned.{m}")][2]) != 0 for m in ("val_loss", "val_perplexity"))

    params = [r for r in table_rows(markdown, 4) if r[0] == "params.yaml"]
    lr_base = yaml.safe_load(at(project, "HEAD~1", "params.yaml"))["train"]["lr"]
    assert params == [["params.yaml", "train.lr", str(lr_base), str(LR_HEAD)]]

    charts = images(markdown, tmp_path)
    assert {p.name for p in charts} == {"curves.png", "eval-metrics.png"}
    for chart in charts:
        check_png(chart)


def test_report_on_the_workspace_with_image_options(project, tmp_path):
    result = report(project, "--base", "HEAD~1", "--out", str(tmp_path / "report.md"),
                    "--images-dir", str(tmp_path / "img"), "--image-url-prefix", "https://example.org/run/7/")
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "https://example.org/run/7/curves.png" in markdown
    assert "https://example.org/run/7/eval-metrics.png" in markdown
    for name in ("curves.png", "eval-metrics.png"):
        check_png(tmp_path / "img" / name)
    # The workspace holds HEAD's results, so its column is HEAD's file.
    head = flatten(json.loads((project / "metrics/eval.json").read_text(encoding="utf-8")))
    rows = {(r[0], r[1]): r[2:] for r in table_rows(markdown, 6)}
    for key, value in head.items():
        assert same(rows[("metrics/eval.json", key)][1], value), key
    # samples.jsonl is on disk here, so the excerpt is there.
    assert "sample answers at head" in markdown


def test_report_refuses_a_revision_without_metrics(project, tmp_path):
    # HEAD~2 is the bare project copy: no `dvc repro` results committed.
    result = report(project, "--base", "HEAD~2", "--head", "HEAD", "--out", str(tmp_path / "pr.md"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "HEAD~2" in result.stderr
    assert "metrics/eval.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pr.md").exists()

    result = report(project, "--base", "no-such-branch", "--out", str(tmp_path / "pr.md"))
    assert result.returncode == 2 and "unknown revision 'no-such-branch'" in result.stderr


def exp_show(project: Path) -> list[dict]:
    """Every experiment's data from `dvc exp show --json`, with its name."""
    found = []
    for baseline in json.loads(run([DVC, "exp", "show", "--json"], project).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                found.append({"name": rev.get("name") or exp.get("name"), **rev["data"]})
    return found


def param(exp: dict, dotted: str):
    value = exp["params"]["params.yaml"]["data"]
    for part in dotted.split("."):
        value = value[part]
    return value


def metric(exp: dict, path: str, dotted: str):
    value = exp["metrics"][path]["data"]
    for part in dotted.split("."):
        value = value[part]
    return value


def test_experiment_set_param_show_and_diff(project, tmp_path):
    run([DVC, "exp", "run", "--temp", "--name", "lr-low", "-S", "train.lr=0.0005"], project)
    exp = next(e for e in exp_show(project) if e["name"] == "lr-low")
    assert param(exp, "train.lr") == 0.0005
    tuned_loss = metric(exp, "metrics/eval.json", "tuned.val_loss")
    head_loss = json.loads((project / "metrics/eval.json").read_text())["tuned"]["val_loss"]
    assert isinstance(tuned_loss, float) and tuned_loss != head_loss

    diff = json.loads(run([DVC, "metrics", "diff", "--json", "HEAD", "lr-low"], project).stdout)
    assert diff["metrics/eval.json"]["tuned.val_loss"] == {
        "old": head_loss, "new": tuned_loss, "diff": pytest.approx(tuned_loss - head_loss)}
    params = json.loads(run([DVC, "params", "diff", "--json", "HEAD", "lr-low"], project).stdout)
    assert params["params.yaml"]["train.lr"]["new"] == 0.0005

    # The report takes an experiment name like any revision.
    result = report(project, "--base", "HEAD", "--head", "lr-low", "--out", str(tmp_path / "pr.md"))
    assert result.returncode == 0, result.stderr
    rows = {(r[0], r[1]): r[2:] for r in table_rows((tmp_path / "pr.md").read_text("utf-8"), 6)}
    assert same(rows[("metrics/eval.json", "tuned.val_loss")][1], tuned_loss)
    assert run(["git", "status", "--porcelain"], project).stdout == "", "a --temp experiment touched the workspace"


def test_queued_sweep_over_lora_rank(project):
    run([DVC, "exp", "run", "--queue", "-S", "evaluate.max_samples=8", "-S", "train.max_steps=10",
         "-S", "train.lora.r=4,8"], project)
    run([DVC, "exp", "run", "--run-all"], project, timeout=1800)
    sweep = [e for e in exp_show(project) if param(e, "train.max_steps") == 10]
    by_rank = {param(e, "train.lora.r"): e for e in sweep}
    assert sorted(by_rank) == [4, 8], [e["name"] for e in sweep]
    for exp in sweep:
        assert metric(exp, "metrics/train.json", "steps") == 10
        assert metric(exp, "metrics/eval.json", "samples") == 8
        for model in ("base", "tuned"):
            assert isinstance(metric(exp, "metrics/eval.json", f"{model}.rougeL"), float)
    # LoRA's trainable parameters grow linearly in r: the rank really reached the model.
    assert (metric(by_rank[8], "metrics/train.json", "trainable_params")
            == 2 * metric(by_rank[4], "metrics/train.json", "trainable_params"))
    assert run([DVC, "queue", "status"], project).stdout.count("Failed") == 0


def tree_hashes(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_push_clone_pull_restores_every_output(project):
    remote = run([DVC, "remote", "list"], project).stdout.split()
    assert remote[0] == "local" and remote[-1] == "(default)", remote
    store = Path(remote[1]).resolve()
    # Beside the project, never inside it: the store must not end up in the repository.
    assert store.parent == project.parent.resolve(), store

    run([DVC, "push"], project)
    assert any(p.is_file() for p in store.rglob("*"))

    clone = project.parent / "clone"  # same parent: the relative remote url finds the same store
    run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    for rel in OUTPUTS:
        assert not (clone / rel).exists(), f"{rel} is in git; it should come from the DVC remote"
    run([DVC, "pull"], clone)
    for rel in OUTPUTS:
        expected = tree_hashes(project, rel)
        assert expected, f"{rel}: missing in the project"
        assert tree_hashes(clone, rel) == expected, rel
    status = json.loads(run([DVC, "status", "--json"], clone).stdout or "{}")
    assert status == {}, f"a fresh clone after `dvc pull` is not up to date, so `dvc repro` would rerun: {status}"
