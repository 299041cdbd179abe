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
from test_provenance import PARAMS as PROVENANCE_PARAMS
from test_provenance import make_lock
from test_significance import eval_at, scores_at

from conftest import copy_project, run, write_params
from sabia_ift.artifacts import PROMPT_SCORES
from sabia_ift.provenance import TRACKED
from sabia_ift.report import Interval, compare, evaluation_section, headline

DVC = str(Path(sys.executable).parent / "dvc")
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
def project(built_project, tmp_path_factory) -> Path:
    # The first run is the shared FAST_PARAMS build (conftest.built_project).
    project = copy_project(built_project, tmp_path_factory.mktemp("experiments") / "project")
    # The tests' private HF cache lives in the project (conftest.project_env); a user's does not.
    with open(project / ".git" / "info" / "exclude", "a", encoding="utf-8") as f:
        f.write("/hf/\n")
    commit(project, "first run")
    write_params(project, {"train": {"lr": LR_HEAD}})
    run([DVC, "repro"], project)
    commit(project, "higher learning rate")
    return project


def at(project: Path, rev: str, path: str) -> str:
    return run(["git", "show", f"{rev}:{path}"], project).stdout


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


def eval_table(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under a '### title' heading, by metric name (arrows stripped)."""
    section = markdown.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| Metric"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].rstrip(" ↑↓")] = cells[1:]
    return rows


def prompt_scores(text: str) -> dict[int, dict]:
    return {r["source_row"]: r for r in map(json.loads, text.splitlines())}


@pytest.mark.slow
def test_report_on_two_commits(project, tmp_path):
    result = report(project, "--base", "HEAD~1", "--head", "HEAD", "--head-label", "this PR",
                    "--out", str(tmp_path / "pr.md"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "pr.md").read_text(encoding="utf-8")
    before, after = (json.loads(at(project, rev, "metrics/eval.json")) for rev in ("HEAD~1", "HEAD"))
    scores = [prompt_scores(at(project, rev, "metrics/eval_prompts.jsonl")) for rev in ("HEAD~1", "HEAD")]
    assert len(scores[0]) == before["samples"] == 16 and scores[0].keys() == scores[1].keys()

    headline = next(line for line in markdown.splitlines() if line.startswith("**"))
    assert headline.startswith("**HEAD~1 → this PR: ") and "16 test prompts" in headline

    # A learning-rate change cannot touch the base model: it is the reference column, not rows.
    assert before["base"] == after["base"]
    assert "### Base model" not in markdown and "delta" not in markdown
    rows = eval_table(markdown, "Tuned model, HEAD~1 → this PR")
    assert list(rows) == [k for k in ("eos_stop_rate", "rougeL", "chrf", "exact_match", "repetition",
                                      "mean_new_tokens", "val_loss", "val_perplexity")]
    for metric, (base_model, old, new, change, verdict) in rows.items():
        assert same(base_model, after["base"][metric]) and same(old, before["tuned"][metric])
        assert same(new, after["tuned"][metric]), (metric, new)
        score = {v: k for k, v in PROMPT_SCORES.items()}.get(metric)
        if score is None:
            assert verdict == "not tested", (metric, verdict)
            continue
        diffs = [scores[1][r]["tuned"][score] - scores[0][r]["tuned"][score] for r in scores[0]]
        point, low, high = (float(x) for x in re.findall(r"[-+]?[\d.]+(?:e[-+]?\d+)?", change))
        assert point == pytest.approx(sum(diffs) / len(diffs), abs=0.01 * max(1, abs(point))), metric
        assert low <= point <= high, (metric, change)
        significant = low > 0 or high < 0
        if not significant:
            assert verdict == "no significant change", (metric, verdict)
        elif metric in HIGHER_IS_BETTER:
            assert ("better" in verdict) == ((point > 0) == HIGHER_IS_BETTER[metric]), (metric, verdict)

    params = [r for r in table_rows(markdown, 4) if r[0] == "params.yaml"]
    lr_base = yaml.safe_load(at(project, "HEAD~1", "params.yaml"))["train"]["lr"]
    assert params == [["params.yaml", "train.lr", str(lr_base), str(LR_HEAD)]]
    charts = images(markdown, tmp_path)
    assert {p.name for p in charts} == {"curves.png", "eval-metrics.png"}
    for chart in charts:
        check_png(chart)

    # For a pull-request comment: charts inside the Markdown, no image links; the PNGs still written.
    result = report(project, "--base", "HEAD~1", "--head", "HEAD", "--charts", "mermaid",
                    "--out", str(tmp_path / "comment" / "pr.md"))
    assert result.returncode == 0, result.stderr
    comment = (tmp_path / "comment" / "pr.md").read_text(encoding="utf-8")
    # The evaluation chart, and the loss curves the tiny run logged at both commits.
    assert "![" not in comment and comment.count("```mermaid") >= 2 and "xychart-beta" in comment
    for name in ("curves.png", "eval-metrics.png"):
        check_png(tmp_path / "comment" / name)


@pytest.mark.slow
def test_report_without_per_prompt_scores_on_the_workspace(project, tmp_path):
    # An older revision without the file: the report falls back to the plain diff and says so.
    scores = project / "metrics" / "eval_prompts.jsonl"
    saved = scores.read_bytes()
    scores.unlink()
    try:
        result = report(project, "--base", "HEAD~1", "--out", str(tmp_path / "report.md"),
                        "--images-dir", str(tmp_path / "img"), "--image-url-prefix", "https://example.org/run/7/")
    finally:
        scores.write_bytes(saved)
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**HEAD~1 → working tree: no per-prompt scores at working tree: no significance test" in markdown
    rows = eval_table(markdown, "Tuned model, HEAD~1 → working tree")
    assert {r[4] for r in rows.values()} == {"not tested"}
    head = json.loads((project / "metrics/eval.json").read_text(encoding="utf-8"))
    for metric, row in rows.items():
        assert same(row[2], head["tuned"][metric]), metric
    assert "https://example.org/run/7/curves.png" in markdown
    assert "https://example.org/run/7/eval-metrics.png" in markdown
    for name in ("curves.png", "eval-metrics.png"):
        check_png(tmp_path / "img" / name)
    # samples.jsonl is on disk here, so the excerpt is there.
    assert "sample answers at working tree" in markdown


@pytest.mark.slow
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


@pytest.mark.slow
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
    rows = eval_table((tmp_path / "pr.md").read_text("utf-8"), "Tuned model, HEAD → lr-low")
    assert same(rows["val_loss"][2], tuned_loss)
    assert run(["git", "status", "--porcelain"], project).stdout == "", "a --temp experiment touched the workspace"


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- the significance test and the evaluation section, on synthetic scores ------------------------

def test_one_more_exact_match_in_a_hundred_is_not_better():
    before = scores_at({"exact_match": [0] * 100, "rougeL": [0.4] * 100})
    after = scores_at({"exact_match": [0] * 99 + [1], "rougeL": [0.4] * 100})
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR")
    row = next(r for r in cmp.tuned if r.metric == "exact_match")
    assert row.plain_diff == pytest.approx(0.01) and row.verdict == "no significant change"
    line = headline(cmp, "main", "this PR")
    assert line == ("main → this PR: no significant change in the tuned model on any of 5 metrics "
                    "(paired bootstrap over 100 test prompts, 95% interval).")
    assert "better" not in "\n".join(evaluation_section(cmp, "main", "this PR", 0.95))


def test_headline_names_better_and_worse_metrics():
    n = 100
    before = scores_at({"rougeL": [0.2 + 0.004 * i for i in range(n)], "repetition": [0.1] * n,
                        "chrf": [30.0] * n, "new_tokens": [20] * n})
    after = scores_at({"rougeL": [0.3 + 0.004 * i for i in range(n)], "repetition": [0.1 + 0.002 * i for i in range(n)],
                       "chrf": [30.0 + (i % 2) - 0.5 for i in range(n)], "new_tokens": [40] * n})
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR")
    verdicts = {r.metric: r.verdict for r in cmp.tuned}
    assert verdicts["rougeL"] == "better" and verdicts["repetition"] == "worse"  # repetition: lower is better
    assert verdicts["chrf"] == "no significant change" and verdicts["mean_new_tokens"] == "changed"
    assert verdicts["val_loss"] == ""  # one number for the whole validation split: nothing to resample
    assert headline(cmp, "main", "this PR") == (
        "main → this PR: the tuned model is better on rougeL and worse on repetition (paired bootstrap over "
        "100 test prompts, 95% interval); no significant change on eos_stop_rate, chrf and exact_match.")


def test_rows_that_cannot_change_are_left_out():
    before = scores_at({"rougeL": [0.2] * 10}, base={"rougeL": [0.1] * 10})
    after = scores_at({"rougeL": [0.5] * 10}, base={"rougeL": [0.1] * 10})
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR")
    assert cmp.base is None
    text = "\n".join(evaluation_section(cmp, "main", "this PR", 0.95))
    assert "delta" not in text and "### Base model" not in text
    assert "| Metric | Base model | main | this PR | Change [95% interval] | Verdict |" in text
    assert "| rougeL ↑ | 0.1 | 0.2 | 0.5 | +0.300 [+0.300, +0.300] | ✅ better |" in text

    # A new base model (or other test prompts) moves the base model's scores: then they are rows too.
    moved = scores_at({"rougeL": [0.5] * 10}, base={"rougeL": [0.3] * 10})
    cmp = compare(eval_at(before), eval_at(moved), before, moved, "main", "this PR")
    text = "\n".join(evaluation_section(cmp, "main", "this PR", 0.95))
    assert "### Base model, main → this PR" in text and "| Base model |" not in text
    assert next(r for r in cmp.base if r.metric == "rougeL").verdict == "better"


def test_without_per_prompt_scores_the_report_says_so():
    after = scores_at({"rougeL": [0.5] * 10})
    cmp = compare(eval_at(scores_at({"rougeL": [0.2] * 10})), eval_at(after), None, after, "main", "this PR")
    assert cmp.untested == "no per-prompt scores at main: no significance test"
    assert all(r.test is None and r.verdict == "" for r in cmp.tuned)
    assert headline(cmp, "main", "this PR").startswith(
        "main → this PR: no per-prompt scores at main: no significance test")
    assert "| rougeL ↑ | 0 | 0.2 | 0.5 | +0.3 | not tested |" in "\n".join(
        evaluation_section(cmp, "main", "this PR", 0.95))


def test_interval_formatting_keeps_one_precision():
    from sabia_ift.report import fmt_interval

    assert fmt_interval(Interval(0.073, 0.0354, 0.111, 100)) == "+0.073 [+0.035, +0.111]"
    assert fmt_interval(Interval(-5.2, -9.87, -1.02, 100)) == "-5.20 [-9.87, -1.02]"
    assert fmt_interval(Interval(0.0, 0.0, 0.0, 100)) == "0 [0, 0]"


class FakeRevision:
    """A revision whose files are given: the report's readers need nothing else."""

    def __init__(self, files: dict[str, object], sha: str | None = "0" * 40):
        self.files, self.sha, self.where = files, sha, "test"

    def read(self, path: str) -> str | None:
        return json.dumps(self.files[path]) if path in self.files else None


def test_benchmark_section_marks_regressions_against_base_and_the_previous_run():
    from sabia_ift.report import BENCHMARKS, benchmark_section

    old = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.55, "delta": 0.05, "n": 100, "num_fewshot": 3}}
    new = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.45, "delta": -0.05, "n": 100, "num_fewshot": 3}}
    lines = benchmark_section(FakeRevision({BENCHMARKS: old}), FakeRevision({BENCHMARKS: new}), "main", "this PR")
    assert lines[0] == "### Portuguese benchmarks at this PR"
    row = next(line for line in lines if line.startswith("| enem"))
    assert "0.4500" in row and "tuned below base" in row and "tuned below the previous run" in row
    assert "tuned at main" in lines[2]
    assert benchmark_section(FakeRevision({}), FakeRevision({}), "main", "this PR") == []


def test_benchmark_section_shows_each_tasks_test_and_its_training_overlap():
    from sabia_ift.report import BENCHMARKS, CONTAMINATION, benchmark_section

    new = {"enem": {"metric": "acc", "base": 0.5, "tuned": 0.6, "delta": 0.1, "n": 120, "num_fewshot": 3,
                    "test": "mcnemar_exact", "ci95": [0.03, 0.17], "p_value": 0.004, "significant": True}}
    # metrics/contamination.json as the contamination stage writes it, by hand.
    contamination = {"n": 13, "policy": "report", "rows_checked": 500,
                     "targets": {"test": {"items": 100, "rows_flagged": 0, "share": 0.0},
                                 "enem": {"items": 120, "rows_flagged": 2, "share": 0.004}},
                     "longest": []}
    lines = benchmark_section(FakeRevision({}), FakeRevision({BENCHMARKS: new, CONTAMINATION: contamination}),
                              "main", "this PR")
    header = next(line for line in lines if line.startswith("| task"))
    assert "95% interval" in header and "| overlap |" in header
    row = next(line for line in lines if line.startswith("| enem"))
    assert "+0.1000 [+0.0300, +0.1700]" in row and "0.0040" in row and "⚠️ 2 rows" in row
    assert "✅ better than base" in row
    assert any("exact McNemar" in line for line in lines)
    without = benchmark_section(FakeRevision({}), FakeRevision({BENCHMARKS: new}), "main", "this PR")
    row = next(line for line in without if line.startswith("| enem"))
    assert "| — | ✅ better than base |" in row


def test_timings_appear_only_for_the_working_tree():
    from sabia_ift.report import TRAIN_TIMINGS, timings_section

    timings = {"device": "cpu", "steady_input_tokens_per_s": 781.9, "runtime_s": 498.0}
    lines = timings_section(FakeRevision({TRAIN_TIMINGS: timings}, sha=None))
    assert any("781.9" in line for line in lines) and "logs/train-timings.json" in lines[1]
    assert timings_section(FakeRevision({TRAIN_TIMINGS: timings})) == []


# --- comparable revisions: fake revisions with hand-written dvc.lock and metrics in a small git repo -------

FAKE_DVC_YAML = {"stages": {
    **{stage: {"cmd": f"python -m stages.{stage}", "deps": [f"stages/{stage}.py"], "params": [stage],
               "outs": [path]} for stage, (path, _) in TRACKED.items()},
    "evaluate": {"cmd": "python -m stages.evaluate", "deps": ["models/adapter"], "params": ["evaluate"],
                 "outs": [{"metrics/eval_prompts.jsonl": {"cache": False}}],
                 "metrics": [{"metrics/eval.json": {"cache": False}}]}}}
N_PROMPTS = 60
RISING = [0.005 * i for i in range(N_PROMPTS)]  # prompts differ, so an interval has a width


def fake_revision(root: Path, *, lock: dict, tuned: list[float], base: list[float], lr: float = 0.001,
                  constraints: str = "torch==2.13.0\n") -> None:
    """The files a revision's `dvc repro` leaves in git: params, lock, metrics, and the library pins."""
    params = {**PROVENANCE_PARAMS, "train": {**PROVENANCE_PARAMS["train"], "lr": lr}, "evaluate": {"max_samples": 60}}
    prompts = scores_at({"rougeL": tuned, "chrf": [100 * x for x in tuned]},
                        base={"rougeL": base, "chrf": [100 * x for x in base]})
    (root / "metrics").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (root / "dvc.yaml").write_text(yaml.safe_dump(FAKE_DVC_YAML, sort_keys=False), encoding="utf-8")
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")
    (root / "constraints.txt").write_text(constraints, encoding="utf-8")
    (root / "metrics" / "eval.json").write_text(json.dumps(eval_at(prompts)), encoding="utf-8")
    (root / "metrics" / "eval_prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in prompts.values()), encoding="utf-8")


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    """A git and DVC repo whose `main` holds one revision's committed results; nothing is ever run."""
    root = tmp_path / "repo"
    root.mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    fake_revision(root, lock=make_lock(), tuned=[0.4 + x for x in RISING], base=[0.1 + x for x in RISING])
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "main's results"], root)
    return root


def commit_revision(root: Path, message: str, **revision) -> None:
    fake_revision(root, **revision)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", message, "--allow-empty"], root)


def report_in(root: Path, monkeypatch, *args: str) -> str:
    """`sabia-ift report ARGS` run in `root`, in this process; its Markdown."""
    import argparse

    from sabia_ift.report import add_arguments, build_report

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(root)
    out = build_report(parser.parse_args([*args, "--out", str(root / "reports" / "pr.md"), "--samples", "0"]))
    return out.read_text(encoding="utf-8")


def headline_of(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("**")).strip("*")


def test_a_rerun_with_nothing_changed_says_no_change(fake_repo, monkeypatch):
    commit_revision(fake_repo, "the same results again", lock=make_lock(), tuned=[0.4 + x for x in RISING],
                    base=[0.1 + x for x in RISING])
    markdown = report_in(fake_repo, monkeypatch, "--base", "main~1", "--head", "main", "--head-label", "this PR")
    assert headline_of(markdown) == (f"main~1 → this PR: no change: the tuned model scored the same on each of "
                                     f"the {N_PROMPTS} test prompts at both revisions.")
    assert "Both revisions were built from the same base model and data (`dvc.lock`)." in markdown


def test_another_machines_base_model_is_not_comparable(fake_repo, monkeypatch):
    """The issue's case: `make repro` on a fresh clone on another CPU, no edits, then `report --base main`."""
    other = make_lock(outs={"models/base": "5d41402abc4b2a76b9719d911017c592.dir",
                            "data/tokenized": "b" * 32 + ".dir", "models/adapter": "c" * 32 + ".dir"})
    # In the working tree, uncommitted, as `make repro` leaves it: the tuned model clearly worse.
    fake_revision(fake_repo, lock=other, tuned=[0.38 + x for x in RISING], base=[0.09 + x for x in RISING])
    markdown = report_in(fake_repo, monkeypatch, "--base", "main")
    assert headline_of(markdown) == (
        "main → working tree: not comparable: the base model differs (hash 1fa5ac8 → 5d41402) while params.base "
        "and the base stage's deps are unchanged — a different machine or library version built it.")
    assert "the tuned adapter changed (hash a537403 → ccccccc) because the base model and the tokenized data did" \
        in markdown
    assert "rebuild main on this machine" in markdown
    # No verdict anywhere: the tables show the plain differences, untested.
    assert "better" not in markdown.replace("better/worse", "") and "worse" not in markdown.replace("better/worse", "")
    rows = eval_table(markdown, "Tuned model, main → working tree")
    assert rows["rougeL"][2] == "-0.02" and rows["rougeL"][3] == "not tested"  # no base column: it changed too


def test_a_real_change_on_the_same_base_keeps_its_intervals_and_verdict(fake_repo, monkeypatch):
    changed = make_lock(params={"train": {**PROVENANCE_PARAMS["train"], "lr": 0.004}},
                        outs={"models/adapter": "d" * 32 + ".dir"})
    commit_revision(fake_repo, "higher learning rate", lock=changed, lr=0.004, tuned=[0.45 + x for x in RISING],
                    base=[0.1 + x for x in RISING])
    markdown = report_in(fake_repo, monkeypatch, "--base", "main~1", "--head", "main", "--head-label", "this PR")
    assert headline_of(markdown).startswith(
        f"main~1 → this PR: the tuned model is better on rougeL and chrf (paired bootstrap over {N_PROMPTS} test "
        "prompts, 95% interval)")
    assert "the tuned adapter changed on purpose (params train.lr; hash a537403 → ddddddd)" in markdown
    rows = eval_table(markdown, "Tuned model, main~1 → this PR")
    assert rows["rougeL"][3] == "+0.0500 [+0.0500, +0.0500]" and rows["rougeL"][4] == "✅ better"
    assert ["params.yaml", "train.lr", "0.001", "0.004"] in table_rows(markdown, 4)


def test_a_base_changed_on_purpose_gets_no_tuned_verdict(fake_repo, monkeypatch):
    bigger = {**PROVENANCE_PARAMS["base"], "tiny": {"hidden_size": 256, "seed": 0}}
    changed = make_lock(params={"base": bigger}, outs={"models/base": "e" * 32 + ".dir",
                                                       "models/adapter": "f" * 32 + ".dir"})
    commit_revision(fake_repo, "a bigger base", lock=changed, tuned=[0.5 + x for x in RISING],
                    base=[0.2 + x for x in RISING])
    markdown = report_in(fake_repo, monkeypatch, "--base", "main~1", "--head", "main", "--head-label", "this PR")
    assert headline_of(markdown) == (
        "main~1 → this PR: the base model changed on purpose (params base.tiny.hidden_size; hash 1fa5ac8 → "
        "eeeeeee), so the tuned models are not compared as if tuned from one base; the base model is better on "
        f"rougeL and chrf (paired bootstrap over {N_PROMPTS} test prompts, 95% interval); no significant change on "
        "eos_stop_rate, exact_match and repetition.")
    tuned = eval_table(markdown, "Tuned model, main~1 → this PR")
    # No base column: the base model has its own table.
    assert tuned["rougeL"][2] == "+0.1000 [+0.1000, +0.1000]" and tuned["rougeL"][3] == "different base"
    assert eval_table(markdown, "Base model, main~1 → this PR")["rougeL"][3] == "✅ better"
    assert "✅" not in markdown.split("### Base model")[0] and "❌" not in markdown


def test_new_library_pins_explain_a_new_base(fake_repo, monkeypatch):
    other = make_lock(outs={"models/base": "5d41402abc4b2a76b9719d911017c592.dir"})
    commit_revision(fake_repo, "torch 2.14", lock=other, constraints="torch==2.14.0\n",
                    tuned=[0.4 + x for x in RISING], base=[0.12 + x for x in RISING])
    markdown = report_in(fake_repo, monkeypatch, "--base", "main~1", "--head", "main")
    assert headline_of(markdown).startswith(
        "main~1 → main: the base model changed on purpose (constraints.txt (library versions); hash 1fa5ac8 → "
        "5d41402), so the tuned models are not compared as if tuned from one base")
