"""`sabia-ift report`: what a change does to the tuned model, as one Markdown report for a pull request.

The report compares the tuned model at two revisions ("main → this PR"), with
the base model as a reference. Each evaluation verdict comes from a paired
bootstrap over the test prompts both revisions scored (metrics/eval_prompts.jsonl,
committed to git by the evaluate stage; significance.py), so a change counts as
better or worse only when its 95% interval excludes 0: on 100 prompts, one more
exact match is noise, not progress. Before any verdict, the two revisions'
dvc.lock say whether both were built from the same base model and data
(provenance.py): when they were not, and nothing that builds them changed, the
headline says the results are not comparable instead. The other metrics and the
params are `dvc metrics diff` and `dvc params diff` as DVC reports them, changed
rows only.

Charts are PNG files next to the report (matplotlib) or, with `--charts mermaid`,
Mermaid charts inside the Markdown, which GitHub renders in comments and job
summaries without hosting any image.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .artifacts import BASE_FILE, PROMPT_SCORES
from .cost import COST_DIR, read_costs
from .errors import SabiaError
from .evaluation.metrics import HIGHER_IS_BETTER
from .provenance import TRACKED, Provenance, compare_locks
from .significance import DIFFERENT_BASE, MODELS, Comparison, Interval, Row, compare, is_number

WORKSPACE = "workspace"
# Must match the outputs in dvc.yaml; the report reads them at both revisions.
EVAL_METRICS = "metrics/eval.json"
BENCHMARKS = "metrics/benchmarks.json"
# Written by the contamination stage: training rows overlapping each benchmark task (the table's overlap column).
CONTAMINATION = "metrics/contamination.json"
# Written by the train stage beside the results, outside git: only the working tree has them.
TRAIN_TIMINGS = "logs/train-timings.json"
EVAL_PROMPTS = "metrics/eval_prompts.jsonl"
CURVES_DIR = "metrics/curves/plots/metrics"
SAMPLES = "data/eval/samples.jsonl"
LOCK = "dvc.lock"
CONSTRAINTS = "constraints.txt"
CURVES = [("train/loss", "training loss"), ("eval/loss", "validation loss"),
          ("train/lr", "learning rate"), ("train/grad_norm", "gradient norm")]
CURVES_PNG = "curves.png"
EVAL_PNG = "eval-metrics.png"
MARKER = "<!-- sabia-ift report -->"
MISSING = "-"
# Scores in [0, 1] (chrF after /100) share one chart axis.
UNIT_SCALE = {"eos_stop_rate": 1, "rougeL": 1, "chrf": 100, "exact_match": 1, "repetition": 1}
COLORS = {"before": "#9e9e9e", "better": "#2e7d32", "worse": "#c62828", "same": "#1565c0", "base": "#212121"}


class ReportError(SabiaError):
    """A revision cannot be compared: unknown, or without the pipeline's metrics."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="revision to compare against: branch, tag, commit or experiment name")
    parser.add_argument("--head", default=WORKSPACE,
                        help=f"revision under review; '{WORKSPACE}' (default) is the files on disk")
    parser.add_argument("--base-label", default=None,
                        help="what to call --base in the report (default: its name, without 'origin/')")
    parser.add_argument("--head-label", default=None,
                        help="what to call --head in the report, e.g. 'this PR' (default: its name)")
    parser.add_argument("--out", default="reports/pr.md", help="Markdown file to write")
    parser.add_argument("--charts", choices=["png", "mermaid"], default="png",
                        help="png: PNG files linked from the report; mermaid: charts inside the Markdown "
                             "that GitHub renders (the PNG files are written too)")
    parser.add_argument("--images-dir", default=None, help="where the PNG charts go (default: next to --out)")
    parser.add_argument("--image-url-prefix", default=None,
                        help="URL the images will be served from (default: paths relative to --out)")
    parser.add_argument("--samples", type=int, default=3,
                        help="side-by-side answers to show from the head's samples file (0: none)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed, so a report is reproducible")
    parser.add_argument("--base-costs", default=None,
                        help="the base revision's logs/cost folder, from its run on this machine (default: none)")
    parser.add_argument("--head-costs", default=None,
                        help="the head's logs/cost folder (default: logs/cost when the head is the working tree)")


# --- reading a revision ------------------------------------------------------------------------

class Revision:
    """A git revision (commit, branch, tag, experiment) or the working tree."""

    def __init__(self, name: str, sha: str | None, label: str | None = None):
        self.name = name
        self.sha = sha  # None: the working tree
        self.label = label or default_label(name)

    @property
    def dvc_rev(self) -> str:
        return self.sha or WORKSPACE

    @property
    def where(self) -> str:
        """The revision exactly, for the line under the headline."""
        if self.sha is None:
            return f"the working tree on top of {_head_sha()}"
        return self.name if self.name.startswith(self.sha[:7]) else f"{self.name} ({self.sha[:7]})"

    def read(self, path: str) -> str | None:
        """Text of `path` (relative to the current folder) at this revision; None if absent."""
        if self.sha is None:
            try:
                return Path(path).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
        # `REV:./path` is relative to the current folder, like the paths DVC prints.
        result = subprocess.run(["git", "show", f"{self.sha}:./{path}"], capture_output=True)
        return result.stdout.decode("utf-8") if result.returncode == 0 else None


def default_label(name: str) -> str:
    if name == WORKSPACE:
        return "working tree"
    return name.removeprefix("origin/")


def resolve(name: str, label: str | None = None) -> Revision:
    if name == WORKSPACE:
        return Revision(name, None, label)
    from dvc.scm import SCM, SCMError, resolve_rev

    try:
        # dvc's resolver also knows experiment names, which git alone does not.
        return Revision(name, resolve_rev(SCM(os.getcwd()), name), label)
    except SCMError as exc:
        raise ReportError(f"unknown revision '{name}': {exc}") from None


def dvc_json(*args: str) -> dict:
    # The same interpreter's dvc, so the report never mixes DVC versions.
    cmd = [sys.executable, "-m", "dvc", *args, "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ReportError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    try:
        return json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        raise ReportError(f"`dvc {' '.join(args)} --json` printed no JSON: {result.stdout[:200]!r}") from None


def check_metrics(rev: Revision, paths: list[str]) -> None:
    missing = [p for p in paths if rev.read(p) is None]
    if missing and rev.sha is None:
        raise ReportError(f"the working tree has no {', '.join(missing)}: run `dvc repro` first")
    if missing:
        raise ReportError(
            f"revision {rev.where} has no {', '.join(missing)}: run `dvc repro` there and commit "
            "dvc.lock and metrics/ (metrics are committed to git, cache: false), or pick another revision"
        )


def read_eval(rev: Revision) -> dict:
    try:
        return json.loads(rev.read(EVAL_METRICS) or "")
    except json.JSONDecodeError as exc:
        raise ReportError(f"{EVAL_METRICS} at {rev.where} is not valid JSON: {exc}") from None


def parse_prompts(text: str | None, where: str) -> dict[int, dict] | None:
    """metrics/eval_prompts.jsonl by source_row; None when the revision predates the file."""
    if text is None:
        return None
    records = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            for model in MODELS:
                for score in PROMPT_SCORES:
                    float(record[model][score])
            records[int(record["source_row"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{EVAL_PROMPTS} at {where}, row {number}: not a per-prompt record "
                              f"({type(exc).__name__}: {exc})") from None
    return records


def read_curve(rev: Revision, name: str) -> list[tuple[float, float]]:
    text = rev.read(f"{CURVES_DIR}/{name}.tsv")
    if not text:
        return []
    column = name.rsplit("/", 1)[-1]
    return [(float(row["step"]), float(row[column]))
            for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def read_output(rev: Revision, path: str) -> str | None:
    """Text of a DVC-tracked output at `rev`, or None: not pulled, not in the cache, no remote."""
    try:
        if rev.sha is None:
            return Path(path).read_text(encoding="utf-8")
        import dvc.api

        with dvc.api.open(path, rev=rev.sha, encoding="utf-8") as f:
            return f.read()
    except Exception:  # whatever DVC raises for an output it cannot find: the caller does without
        return None


def read_samples(rev: Revision, limit: int) -> list[dict]:
    """The head's first samples, or none: the file is a DVC-cached output that may not be here."""
    text = read_output(rev, SAMPLES) if limit > 0 else None
    try:
        rows = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
    except json.JSONDecodeError:  # the excerpt is optional
        return []
    return rows[:limit]


def read_lock(rev: Revision) -> dict | None:
    import yaml

    text = rev.read(LOCK)
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise ReportError(f"{LOCK} at {rev.where} is not valid YAML: {exc}") from None


def read_provenance(base: Revision, head: Revision) -> Provenance:
    """Whether both revisions were built from the same base model and data, from their dvc.lock."""
    def base_record(rev: Revision) -> dict | None:
        text = read_output(rev, f"{TRACKED['base'][0]}/{BASE_FILE}")
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None

    # The library versions shape every stage's output, though no stage lists them as a dep.
    changed = [CONSTRAINTS] if base.read(CONSTRAINTS) != head.read(CONSTRAINTS) else []
    return compare_locks(read_lock(base), read_lock(head), changed_files=changed,
                         base_records=lambda: (base_record(base), base_record(head)),
                         labels=(base.label, head.label))


# --- the headline --------------------------------------------------------------------------

def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _verdicts(rows: list[Row]) -> tuple[list[str], list[str], list[str], list[str]]:
    """The tested metrics with a direction, and those better, worse and not significantly changed."""
    tested = [r for r in rows if r.test is not None and r.metric in HIGHER_IS_BETTER]
    return ([r.metric for r in tested], [r.metric for r in tested if r.verdict == "better"],
            [r.metric for r in tested if r.verdict == "worse"],
            [r.metric for r in tested if r.verdict == "no significant change"])


def _summary(model: str, rows: list[Row], how: str) -> str:
    """'the tuned model is better on rougeL and worse on chrf (HOW); no significant change on eos_stop_rate'."""
    tested, better, worse, same = _verdicts(rows)
    if not better and not worse:
        return f"no significant change in {model} on any of {len(tested)} metrics ({how})"
    parts = ([f"better on {_join(better)}"] if better else []) + ([f"worse on {_join(worse)}"] if worse else [])
    rest = f"; no significant change on {_join(same)}" if same else ""
    return f"{model} is {' and '.join(parts)} ({how}){rest}"


def headline(cmp: Comparison, before_label: str, after_label: str, confidence: float = 0.95,
             provenance: Provenance | None = None) -> str:
    """One sentence: better, worse or no significant change, and on which metrics; or why there is no verdict."""
    change = f"{before_label} → {after_label}"
    if provenance is not None and provenance.unexplained:
        return f"{change}: not comparable: {provenance.not_comparable()}."
    if cmp.untested:
        return f"{change}: {cmp.untested}; the tables show the plain metrics diff."
    how = f"paired bootstrap over {cmp.shared} test prompts, {confidence:.0%} interval"
    if cmp.different_base and cmp.base is not None:
        base = provenance.base if provenance is not None else None
        why = base.sentence() if base is not None else "the base model changed"
        return (f"{change}: {why}, so the tuned models are not compared as if tuned from one base; "
                f"{_summary('the base model', cmp.base, how)}.")
    tested = [r for r in cmp.tuned if r.test is not None]
    if tested and all(r.unchanged for r in tested):
        return (f"{change}: no change: the tuned model scored the same on each of the {cmp.shared} test "
                "prompts at both revisions.")
    return f"{change}: {_summary('the tuned model', cmp.tuned, how)}."


def provenance_note(provenance: Provenance, before: str, said: str = "") -> list[str]:
    """What dvc.lock says about the inputs both revisions were built from, under the headline
    (`said`), less what the headline already says."""
    if provenance.unchecked:
        return [f"{provenance.unchecked[0].upper()}{provenance.unchecked[1:]}: the report cannot check that "
                "both revisions were built from the same base model and data.", ""]
    if not provenance.differences:
        return ["Both revisions were built from the same base model and data (`dvc.lock`).", ""]
    sentences = [d.sentence() for d in provenance.differences if d.sentence() not in said]
    text = ("Built from (`dvc.lock`): " + "; ".join(sentences) + ".") if sentences else ""
    if provenance.unexplained:
        text += (f" A verdict would measure the machines, not the change: rebuild {before} on this machine "
                 "and compare with that (docs/experiments.md, *Comparing on one machine*).")
    return [text.strip(), ""] if text else []


# --- formatting --------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    """A value as the metrics file holds it; 10 significant digits hide only float noise."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def fmt_signed(value: float, decimals: int | None = None) -> str:
    if value == 0:
        return "0"
    return f"{value:+.4g}" if decimals is None else f"{value:+.{decimals}f}"


def fmt_interval(t: Interval) -> str:
    """Change and interval with one number of decimals: three significant digits of the largest."""
    largest = max(abs(t.change), abs(t.low), abs(t.high))
    decimals = max(0, 2 - math.floor(math.log10(largest))) if largest > 0 else 0
    return f"{fmt_signed(t.change, decimals)} [{fmt_signed(t.low, decimals)}, {fmt_signed(t.high, decimals)}]"


def fmt_change(change: dict) -> str:
    diff = change.get("diff")
    if is_number(diff):
        return "0" if diff == 0 else (f"{diff:+d}" if isinstance(diff, int) else f"{diff:+.10g}")
    if change.get("old") != change.get("new"):
        return "changed"
    return ""


VERDICT_MARK = {"better": "✅ better", "worse": "❌ worse"}
# A metric's direction, shown after its name; "" where none is known.
ARROWS: dict[bool | None, str] = {True: " ↑", False: " ↓", None: ""}


def row_cells(row: Row) -> list[str]:
    if row.test is not None:
        change = fmt_interval(row.test)
        verdict = VERDICT_MARK.get(row.verdict, row.verdict)
    else:
        diff = row.plain_diff
        change = fmt_signed(diff) if diff is not None else ("changed" if row.before != row.after else "")
        verdict = "not tested"
    arrow = ARROWS[HIGHER_IS_BETTER.get(row.metric)]
    return [row.metric + arrow, fmt(row.before), fmt(row.after), change, verdict]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def evaluation_section(cmp: Comparison, before: str, after: str, confidence: float) -> list[str]:
    level = f"{confidence:.0%}"
    change_header = f"Change [{level} interval]"
    lines = [f"### Tuned model, {before} → {after}", ""]
    if cmp.base is None:
        headers = ["Metric", "Base model", before, after, change_header, "Verdict"]
        rows = [[r[0], fmt(cmp.base_reference.get(row.metric)), *r[1:]]
                for row, r in ((row, row_cells(row)) for row in cmp.tuned)]
    else:
        headers = ["Metric", before, after, change_header, "Verdict"]
        rows = [row_cells(row) for row in cmp.tuned]
    lines += table(headers, rows)
    lines.append("")
    notes = []
    if cmp.untested:
        notes.append(f"{cmp.untested[0].upper()}{cmp.untested[1:]}; the change is the plain difference.")
    else:
        notes.append(f"Change: mean per-prompt difference over the {cmp.shared} test prompts both revisions "
                     f"scored ({before}: {cmp.prompts[0]}, {after}: {cmp.prompts[1]}), with its {level} "
                     "paired-bootstrap interval; a verdict needs the interval to exclude 0. chrf's change is "
                     "in sentence-level chrF (each prompt's score); the columns show corpus chrF. "
                     "val_loss and val_perplexity are measured on the validation split as a whole, so they are "
                     "not tested.")
    if cmp.base is None:
        notes.append("The base model's scores are the same at both revisions, so it appears once, as the "
                     "reference.")
    if cmp.different_base:
        notes.append("The tuned models start from different base models, so their changes get an interval but "
                     f"no better/worse verdict (\"{DIFFERENT_BASE}\"): they would credit the tuning with what the "
                     "new base does. The base model's own change is below.")
    lines += [" ".join(notes), ""]
    if cmp.base is not None:
        lines += [f"### Base model, {before} → {after}", "",
                  "The base model's scores changed too: the base model, the test prompts or the decoding "
                  "settings differ between the revisions.", ""]
        lines += table(["Metric", before, after, change_header, "Verdict"], [row_cells(r) for r in cmp.base])
        lines.append("")
    return lines


# --- charts ------------------------------------------------------------------------------------

def verdict_color(row: Row) -> str:
    return COLORS.get(row.verdict, COLORS["same"])


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def mermaid_eval(cmp: Comparison, before: str, after: str) -> list[str]:
    """The tuned model before and after, coloured by verdict, with the base model as a line.

    Mermaid colours a whole series, so each colour is its own series, zero where
    it does not apply; a bar of 0 draws nothing.
    """
    rows = [r for r in cmp.tuned if r.metric in UNIT_SCALE and is_number(r.before) and is_number(r.after)]
    if not rows:
        return []
    names: list[str] = []
    grey: list[float] = []
    series: dict[str, list[float]] = {"better": [], "worse": [], "same": []}
    reference: list[float] = []
    for row in rows:
        scale = UNIT_SCALE[row.metric]
        metric = row.metric if scale == 1 else f"{row.metric}/{scale}"
        names += [f"{metric} · {before}", f"{metric} · {after}"]
        grey += [row.before / scale, 0]
        for colour in series:
            hit = (row.verdict if row.verdict in ("better", "worse") else "same") == colour
            series[colour] += [0, row.after / scale if hit else 0]
        base = cmp.base_reference.get(row.metric)
        reference += [base / scale if base is not None and is_number(base) else 0] * 2
    palette = ", ".join(COLORS[k] for k in ("before", "better", "worse", "same", "base"))
    return ["```mermaid",
            "---",
            "config:",
            "  xyChart:",
            "    chartOrientation: horizontal",
            f"    height: {120 + 40 * len(names)}",
            "  themeVariables:",
            "    xyChart:",
            f'      plotColorPalette: "{palette}"',
            "---",
            "xychart-beta",
            f"  title {_quote(f'Tuned model, {before} → {after}')}",
            "  x-axis [" + ", ".join(_quote(n) for n in names) + "]",
            '  y-axis "score" 0 --> 1',
            f"  bar {_values(grey)}",
            *(f"  bar {_values(series[c])}" for c in ("better", "worse", "same")),
            f"  line {_values(reference)}",
            "```",
            "",
            f"Grey: {before}. {after}: green better, red worse, blue no significant change (or not tested). "
            "Dark line: the base model. ↓ metrics (repetition) are better lower.",
            ""]


def mermaid_curve(base: Revision, head: Revision, name: str, title: str, points: int = 40) -> list[str]:
    """One DVCLive curve at both revisions, on the steps both logged (Mermaid lines have no gaps)."""
    import numpy as np

    curves = [(rev.label, read_curve(rev, name)) for rev in (base, head)]
    curves = [(label, c) for label, c in curves if len(c) >= 2]
    if not curves:
        return []
    first = max(c[0][0] for _, c in curves)
    last = min(c[-1][0] for _, c in curves)
    if last <= first:
        return []
    steps = np.linspace(first, last, points)
    lines = [np.interp(steps, [p[0] for p in c], [p[1] for p in c]) for _, c in curves]
    # The head is blue whether or not the base logged this curve.
    colours = [("grey", COLORS["before"]), ("blue", COLORS["same"])][-len(curves):]
    palette = ", ".join(hex_ for _, hex_ in colours)
    legend = " · ".join(f"{label}: {word}" for (label, _), (word, _) in zip(curves, colours))
    return ["```mermaid",
            "---",
            "config:",
            "  themeVariables:",
            "    xyChart:",
            f'      plotColorPalette: "{palette}"',
            "---",
            "xychart-beta",
            f"  title {_quote(title)}",
            f'  x-axis "step" {first:.6g} --> {last:.6g}',
            *(f"  line {_values(list(v))}" for v in lines),
            "```",
            "",
            f"{legend} (steps {first:.6g}–{last:.6g}, logged at both).",
            ""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(base: Revision, head: Revision, out: Path) -> bool:
    curves = {name: (read_curve(base, name), read_curve(head, name)) for name, _ in CURVES}
    if not any(b or h for b, h in curves.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, title) in zip(axes.flat, CURVES):
        for points, label, style, colour in ((curves[name][0], base.label, "--", COLORS["before"]),
                                             (curves[name][1], head.label, "-", COLORS["same"])):
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, color=colour, marker=".",
                        label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def plot_eval(cmp: Comparison, before: str, after: str, out: Path) -> bool:
    rows = [r for r in cmp.tuned if is_number(r.before) and is_number(r.after)]
    if not rows:
        return False
    plt = _pyplot()
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        values = [row.before, row.after]
        bars = ax.bar([before, after], values, color=[COLORS["before"], verdict_color(row)])
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8)
        top = max(values)
        base = cmp.base_reference.get(row.metric)
        if is_number(base):
            ax.axhline(base, color=COLORS["base"], linestyle="--", linewidth=1)
            top = max(top, base)
        arrow = ARROWS[HIGHER_IS_BETTER.get(row.metric)]
        ax.set_title(f"{row.metric}{arrow}\n{row.verdict or 'not tested'}", fontsize=9)
        # All-zero rates would otherwise get a symmetric axis around 0.
        ax.set_ylim(min(0, *values), top * 1.2 if top > 0 else 1)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"tuned model, {before} → {after}: green better, red worse, blue no significant change "
                 "(or not tested); dashed line: base model", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


# --- the report --------------------------------------------------------------------------------

def read_json(rev: Revision, path: str) -> dict | None:
    text = rev.read(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} at {rev.where} is not valid JSON: {exc}") from None


def benchmark_section(base: Revision, head: Revision, before: str, after: str) -> list[str]:
    """Portuguese benchmarks at head, base model vs tuned model, regressions marked."""
    from .evaluation.benchmark_report import BENCHMARK_HEADERS, benchmark_rows

    new = read_json(head, BENCHMARKS)
    if not new:
        return []
    headers = [h if h != "tuned before" else f"tuned at {before}" for h in BENCHMARK_HEADERS]
    rows = benchmark_rows(read_json(base, BENCHMARKS), new, read_json(head, CONTAMINATION))
    note = ("Each tuned − base change's 95% interval and p-value come from a paired test over the examples both models "
            "answered (exact McNemar for accuracy, paired bootstrap for F1 and Pearson); \"overlap\": training "
            "rows sharing an n-gram with the task's examples (— where the contamination check did not run).")
    return [f"### Portuguese benchmarks at {after}", "", *table(headers, rows), "", note, ""]


def timings_section(head: Revision) -> list[str]:
    """How fast this machine trained: shown, never compared (timings are not results)."""
    timings = read_json(head, TRAIN_TIMINGS) if head.sha is None else None
    if not timings:
        return []
    keys = ["device", "processes", "steady_input_tokens_per_s", "step_time_s", "runtime_s", "peak_memory_gib",
            "peak_step_memory_gib"]
    rows = [[key, fmt(timings[key])] for key in keys if key in timings]
    return ["<details>", f"<summary>Training speed on this machine (<code>{TRAIN_TIMINGS}</code>)</summary>", "",
            *table(["Timing", "Value"], rows), "", "</details>", ""]


DVC_FILE = "dvc.yaml"  # its stage order is the order of the cost table


def _cost_cell(old: dict | None, new: dict | None, key: str, unit: str, scale: float = 1.0) -> str:
    def one(record: dict | None) -> str:
        value = None if record is None else record.get(key)
        return MISSING if value is None else f"{value / scale:,.1f} {unit}"

    return f"{one(old)} → {one(new)}"


def cost_section(base_dir: str | None, head_dir: str | None, before: str, after: str) -> list[str]:
    """What each stage cost at each revision (logs/cost, sabia_ift/cost.py), beside the results.

    A stage missing on one side did not run there: DVC reused its outputs, or no log was given.
    """
    old = read_costs(base_dir) if base_dir and Path(base_dir).is_dir() else {}
    new = read_costs(head_dir) if head_dir and Path(head_dir).is_dir() else {}
    if not old and not new:
        return []
    try:
        order = list(yaml.safe_load(Path(DVC_FILE).read_text(encoding="utf-8"))["stages"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        order = []
    stages = [s for s in order if s in old or s in new] + sorted((set(old) | set(new)) - set(order))
    rows = [[stage, _cost_cell(old.get(stage), new.get(stage), "wall_s", "s"),
             _cost_cell(old.get(stage), new.get(stage), "cpu_s", "s"),
             _cost_cell(old.get(stage), new.get(stage), "gpu_s", "GPU-h", 3600),
             _cost_cell(old.get(stage), new.get(stage), "energy_j", "Wh", 3600)] for stage in stages]

    def total(costs: dict[str, dict]) -> dict | None:
        if not costs:
            return None
        sums: dict[str, float | None] = {}
        for key in ("wall_s", "cpu_s", "gpu_s", "energy_j"):
            values = [c.get(key) for c in costs.values()]
            known = [v for v in values if v is not None]
            sums[key] = sum(known) if known else None
        return sums

    rows.append(["**all stages run**", *(_cost_cell(total(old), total(new), key, unit, scale) for key, unit, scale in
                                         (("wall_s", "s", 1), ("cpu_s", "s", 1), ("gpu_s", "GPU-h", 3600),
                                          ("energy_j", "Wh", 3600)))])
    note = (f"{before} → {after}, per stage as it ran on the machine that made this report "
            f"(`{COST_DIR}`); {MISSING}: the stage did not run there (DVC reused its outputs) or the "
            "machine has no such counter. GPU time is wall time times the GPUs used; energy is NVML's "
            "counter of those GPUs.")
    return ["### Cost of each run", "", note, "", *table(["Stage", "Wall time", "CPU time", "GPU time", "GPU energy"],
                                                         rows), ""]


def other_metrics_section(metrics: dict, before: str, after: str) -> list[str]:
    """The pipeline's other metrics files: changed values shown, unchanged ones counted."""
    others = [p for p in sorted(metrics) if Path(p).as_posix() not in (EVAL_METRICS, BENCHMARKS)]
    changed = [[path, key, fmt(c.get("old")), fmt(c.get("new")), fmt_change(c)]
               for path in others for key, c in sorted(metrics[path].items()) if c.get("old") != c.get("new")]
    total = sum(len(metrics[p]) for p in others)
    if not total:
        return []
    lines = ["<details>", f"<summary>Training and data metrics: {len(changed)} of {total} changed</summary>", ""]
    if changed:
        lines += table(["Path", "Metric", before, after, "Change"], changed)
    else:
        lines.append("None changed.")
    return lines + ["", "</details>", ""]


def build_report(args: argparse.Namespace) -> Path:
    if args.resamples < 1 or not 0 < args.confidence < 1:
        raise ReportError(f"--resamples must be 1 or more and --confidence between 0 and 1, got "
                          f"{args.resamples} and {args.confidence}")
    base, head = resolve(args.base, args.base_label), resolve(args.head, args.head_label)
    out = Path(args.out)
    images_dir = Path(args.images_dir) if args.images_dir else out.parent
    before, after = base.label, head.label

    # --all: unchanged values too, so the report can count them.
    metrics = dvc_json("metrics", "diff", "--all", base.dvc_rev, head.dvc_rev)
    files = sorted(set(metrics) | {EVAL_METRICS})
    for rev in (base, head):
        check_metrics(rev, files)
    params = dvc_json("params", "diff", base.dvc_rev, head.dvc_rev)
    provenance = read_provenance(base, head)
    base_model = provenance.base
    cmp = compare(read_eval(base), read_eval(head),
                  parse_prompts(base.read(EVAL_PROMPTS), base.where),
                  parse_prompts(head.read(EVAL_PROMPTS), head.where),
                  before, after, resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                  # Scores of models built by different machines differ by the machines: no test.
                  untested=("not comparable (the headline says why): no significance test"
                            if provenance.unexplained else None),
                  same_base=base_model is None)

    images_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    def image(name: str) -> str:
        if args.image_url_prefix:
            return f"{args.image_url_prefix.rstrip('/')}/{name}"
        return Path(os.path.relpath(images_dir / name, out.parent)).as_posix()

    said = headline(cmp, before, after, args.confidence, provenance)
    lines = [MARKER, f"## Sabiá IFT: {before} → {after}", "", f"**{said}**", "",
             f"{before}: `{base.where}` · {after}: `{head.where}`", ""]
    lines += provenance_note(provenance, before, said)
    lines += evaluation_section(cmp, before, after, args.confidence)

    has_eval_png = plot_eval(cmp, before, after, images_dir / EVAL_PNG)
    has_curves_png = plot_curves(base, head, images_dir / CURVES_PNG)
    lines += ["### Charts", ""]
    if args.charts == "mermaid":
        lines += mermaid_eval(cmp, before, after)
        curves = [line for name, title in CURVES[:2] for line in mermaid_curve(base, head, name, title)]
        lines += curves or [f"No training curves under `{CURVES_DIR}` at either revision.", ""]
        pngs = [name for name, made in ((EVAL_PNG, has_eval_png), (CURVES_PNG, has_curves_png)) if made]
        if pngs:
            lines += [f"Every metric and curve as PNG: {', '.join(f'`{p}`' for p in pngs)}, written beside "
                      "this report.", ""]
    else:
        if has_eval_png:
            lines += [f"![tuned model, {before} → {after}, base model as a line]({image(EVAL_PNG)})", ""]
        if has_curves_png:
            lines += [f"![training curves, {before} dashed, {after} solid]({image(CURVES_PNG)})", ""]
        else:
            lines += [f"No training curves under `{CURVES_DIR}` at either revision.", ""]

    lines += benchmark_section(base, head, before, after)
    lines += other_metrics_section(metrics, before, after)
    lines += timings_section(head)
    lines += cost_section(args.base_costs, args.head_costs or (str(COST_DIR) if head.sha is None else None),
                          before, after)

    lines += ["### Parameters", ""]
    param_rows = [[path, key, fmt(c.get("old")), fmt(c.get("new"))]
                  for path in sorted(params) for key, c in sorted(params[path].items())]
    if param_rows:
        lines += table(["Path", "Param", before, after], param_rows)
    else:
        lines.append("No parameter changed.")
    lines.append("")

    samples = read_samples(head, args.samples)
    if samples:
        lines += ["<details>", f"<summary>{len(samples)} sample answers at {after} (from <code>{SAMPLES}</code>)"
                  "</summary>", ""]
        sample_rows = [[_clip(_task(s.get("prompt", "")), 300), _clip(s.get("reference", ""), 200),
                        _clip(s.get("base", ""), 200), _clip(s.get("tuned", ""), 200)] for s in samples]
        lines += table(["Instruction", "Reference", "Base model", "Tuned model"], sample_rows)
        lines += ["", "</details>", ""]

    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return out


def _head_sha() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip()[:7] if result.returncode == 0 else "no commit yet"


def _task(prompt: str) -> str:
    # The template's boilerplate is the same in every row; only the task tells samples apart.
    body = prompt.split("### Instrução:\n", 1)[-1].rsplit("### Resposta:", 1)[0]
    return body.replace("### Entrada:\n", "Entrada: ").strip()


def _clip(text: str, limit: int) -> str:
    text = str(text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
