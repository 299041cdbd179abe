"""`sabia-ift report`: one Markdown report comparing two revisions, for a pull-request comment.

The tables are `dvc metrics diff` and `dvc params diff` as DVC reports them, so
the report cannot disagree with what a reviewer gets by running DVC by hand.
Charts are PNG files written next to the report (matplotlib, no JavaScript or
CDN), so the report renders offline and in a PR comment once the images are
uploaded.
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

from .errors import SabiaError
from .evaluation.metrics import HIGHER_IS_BETTER

WORKSPACE = "workspace"
# Must match the outputs in dvc.yaml; the report reads them at both revisions.
EVAL_METRICS = "metrics/eval.json"
CURVES_DIR = "metrics/curves/plots/metrics"
SAMPLES = "data/eval/samples.jsonl"
CURVES = [("train/loss", "training loss"), ("eval/loss", "validation loss"),
          ("train/lr", "learning rate"), ("train/grad_norm", "gradient norm")]
CURVES_PNG = "curves.png"
EVAL_PNG = "eval-metrics.png"
MARKER = "<!-- sabia-ift report -->"
MISSING = "-"


class ReportError(SabiaError):
    """A revision cannot be compared: unknown, or without the pipeline's metrics."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="revision to compare against: branch, tag, commit or experiment name")
    parser.add_argument("--head", default=WORKSPACE,
                        help=f"revision under review; '{WORKSPACE}' (default) is the files on disk")
    parser.add_argument("--out", default="reports/pr.md", help="Markdown file to write")
    parser.add_argument("--images-dir", default=None, help="where the PNG charts go (default: next to --out)")
    parser.add_argument("--image-url-prefix", default=None,
                        help="URL the images will be served from (default: paths relative to --out)")
    parser.add_argument("--samples", type=int, default=3,
                        help="side-by-side answers to show from the head's samples file (0: none)")


# --- reading a revision ------------------------------------------------------------------------

class Revision:
    """A git revision (commit, branch, tag, experiment) or the working tree."""

    def __init__(self, name: str, sha: str | None):
        self.name = name
        self.sha = sha  # None: the working tree

    @property
    def dvc_rev(self) -> str:
        return self.sha or WORKSPACE

    @property
    def label(self) -> str:
        if self.sha is None:
            return WORKSPACE
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


def resolve(name: str) -> Revision:
    if name == WORKSPACE:
        return Revision(name, None)
    from dvc.scm import SCM, SCMError, resolve_rev

    try:
        # dvc's resolver also knows experiment names, which git alone does not.
        return Revision(name, resolve_rev(SCM(os.getcwd()), name))
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
            f"revision {rev.label} has no {', '.join(missing)}: run `dvc repro` there and commit "
            "dvc.lock and metrics/ (metrics are committed to git, cache: false), or pick another revision"
        )


def read_curve(rev: Revision, name: str) -> list[tuple[float, float]]:
    text = rev.read(f"{CURVES_DIR}/{name}.tsv")
    if not text:
        return []
    column = name.rsplit("/", 1)[-1]
    return [(float(row["step"]), float(row[column]))
            for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def read_samples(rev: Revision, limit: int) -> list[dict]:
    """The head's first samples, or none: the file is a DVC-cached output that may not be here."""
    if limit <= 0:
        return []
    try:
        if rev.sha is None:
            text = Path(SAMPLES).read_text(encoding="utf-8")
        else:
            import dvc.api

            with dvc.api.open(SAMPLES, rev=rev.sha, encoding="utf-8") as f:
                text = f.read()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except Exception:  # not pulled, not in the cache, no remote: the excerpt is optional
        return []
    return rows[:limit]


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


def fmt_change(change: dict) -> str:
    diff = change.get("diff")
    if isinstance(diff, (int, float)) and not isinstance(diff, bool):
        return "0" if diff == 0 else (f"{diff:+d}" if isinstance(diff, int) else f"{diff:+.10g}")
    if change.get("old") != change.get("new"):
        return "changed"
    return ""


def verdict(path: str, key: str, change: dict) -> str:
    """Better or worse, for the evaluation metrics whose direction is known."""
    leaf = key.rsplit(".", 1)[-1]
    diff = change.get("diff")
    if Path(path).as_posix() != EVAL_METRICS or leaf not in HIGHER_IS_BETTER:
        return ""
    if not isinstance(diff, (int, float)) or diff == 0 or (isinstance(diff, float) and math.isnan(diff)):
        return ""
    return "✅ better" if (diff > 0) == HIGHER_IS_BETTER[leaf] else "❌ worse"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def eval_order(key: str) -> tuple:
    # The tuned model first: it is what the pull request changes.
    model, _, leaf = key.rpartition(".")
    group = {"tuned": 0, "delta": 1, "base": 2}.get(model, 3)
    known = list(HIGHER_IS_BETTER)
    return group, known.index(leaf) if leaf in known else len(known), key


def metrics_rows(path: str, changes: dict) -> list[list[str]]:
    keys = sorted(changes, key=eval_order if Path(path).as_posix() == EVAL_METRICS else str)
    return [[path, key, fmt(changes[key].get("old")), fmt(changes[key].get("new")),
             fmt_change(changes[key]), verdict(path, key, changes[key])] for key in keys]


# --- charts ------------------------------------------------------------------------------------

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
        for points, label, style in ((curves[name][0], f"base: {base.label}", "--"),
                                     (curves[name][1], f"head: {head.label}", "-")):
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", label=label)
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


def plot_eval(head_eval: dict, head: Revision, out: Path) -> bool:
    base_m, tuned_m = head_eval.get("base") or {}, head_eval.get("tuned") or {}
    keys = [k for k in base_m if isinstance(base_m[k], (int, float)) and isinstance(tuned_m.get(k), (int, float))]
    if not keys:
        return False
    plt = _pyplot()
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = [base_m[key], tuned_m[key]]
        bars = ax.bar(["base", "tuned"], values, color=["#9e9e9e", "#2e7d32"])
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        arrow = {True: " ↑", False: " ↓"}.get(HIGHER_IS_BETTER.get(key), "")
        ax.set_title(key + arrow)
        # All-zero rates would otherwise get a symmetric axis around 0.
        ax.set_ylim(min(0, *values), max(values) * 1.2 if max(values) > 0 else 1)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"base model vs tuned model at {head.label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


# --- the report --------------------------------------------------------------------------------

def build_report(args: argparse.Namespace) -> Path:
    base, head = resolve(args.base), resolve(args.head)
    out = Path(args.out)
    images_dir = Path(args.images_dir) if args.images_dir else out.parent

    # --all: unchanged metrics too, so the comment shows where the PR stands, not only what moved.
    metrics = dvc_json("metrics", "diff", "--all", base.dvc_rev, head.dvc_rev)
    files = sorted(set(metrics) | {EVAL_METRICS})
    for rev in (base, head):
        check_metrics(rev, files)
    params = dvc_json("params", "diff", base.dvc_rev, head.dvc_rev)
    try:
        head_eval = json.loads(head.read(EVAL_METRICS))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{EVAL_METRICS} at {head.label} is not valid JSON: {exc}") from None

    images_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    def image(name: str) -> str:
        if args.image_url_prefix:
            return f"{args.image_url_prefix.rstrip('/')}/{name}"
        return Path(os.path.relpath(images_dir / name, out.parent)).as_posix()

    head_desc = f"`{head.label}`"
    if head.sha is None:
        head_desc += f" (the working tree on top of `{_head_sha()}`)"
    lines = [MARKER, "## Sabiá IFT: what this change does to the tuned model", "",
             f"**Base** `{base.label}` · **Head** {head_desc}", "",
             "Tables are `dvc metrics diff --all` and `dvc params diff`; a verdict marks an evaluation "
             "metric whose direction is known (`HIGHER_IS_BETTER` in `sabia_ift/metrics/__init__.py`).", ""]

    headers = ["Path", "Metric", "Base", "Head", "Change", "Verdict"]
    eval_path = next((p for p in metrics if Path(p).as_posix() == EVAL_METRICS), EVAL_METRICS)
    lines += ["### Evaluation: base model, tuned model and their delta", ""]
    lines += table(headers, metrics_rows(eval_path, metrics.get(eval_path, {})))
    lines.append("")

    others = [p for p in sorted(metrics) if p != eval_path]
    if others:
        rows = [row for path in others for row in metrics_rows(path, metrics[path])]
        changed = sum(1 for path in others for c in metrics[path].values() if c.get("old") != c.get("new"))
        lines += ["<details>", f"<summary>Training and data metrics ({changed} of {len(rows)} changed)</summary>",
                  ""]
        lines += table(headers, rows)
        lines += ["", "</details>", ""]

    lines += ["### Parameters", ""]
    param_rows = [[path, key, fmt(c.get("old")), fmt(c.get("new"))]
                  for path in sorted(params) for key, c in sorted(params[path].items())]
    if param_rows:
        lines += table(["Path", "Param", "Base", "Head"], param_rows)
    else:
        lines.append("No parameter changed.")
    lines.append("")

    lines += ["### Charts", ""]
    if plot_curves(base, head, images_dir / CURVES_PNG):
        lines += [f"![training curves, base dashed, head solid]({image(CURVES_PNG)})", ""]
    else:
        lines += [f"No training curves under `{CURVES_DIR}` at either revision.", ""]
    if plot_eval(head_eval, head, images_dir / EVAL_PNG):
        lines += [f"![base model vs tuned model at head]({image(EVAL_PNG)})", ""]

    samples = read_samples(head, args.samples)
    if samples:
        lines += ["<details>", f"<summary>{len(samples)} sample answers at head (from <code>{SAMPLES}</code>)"
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
