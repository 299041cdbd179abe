"""What a 7B experiment costs stage by stage on one CUDA card: the stages DVC runs for a first
experiment, then for one that changes only `train.lr`.

    python bench/experiment_stages.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer \
        --pt-eval ../shared/pt-eval --work /tmp/bench --out bench/results --phase first|lr_only|base [--limit 40]

The random LLaMA-7B (bench/gpu_qlora.py builds it) as the base, the Sabiá-7B
preset's train, evaluate and benchmark settings (QLoRA r=32 on q/k/v, 3
epochs, fast configuration; 300 prompts of up to 512 new tokens; the five
leaderboard tasks from local copies of the publishers' files, --limit examples
a task), on the realistic rows (all of them: 300 held out for the evaluation,
50 for validation, the rest trained on). Each stage runs its script as dvc.yaml
does, one process each. The stages each phase runs are the ones DVC chose on
the same pipeline (BENCHMARKS.md, "An experiment that changes only the learning
rate, through DVC"; tests/test_dvc_yaml.py checks the dependency graph):

  first     base, fetch, format, tokenize, train, evaluate_base, evaluate, benchmark_base, benchmark
  lr_only   train, evaluate, benchmark (the base model's stages are DVC's cached outputs)
  base      base, fetch, format, tokenize, evaluate_base, benchmark_base: only what lr_only reads,
            for a short device run (lr_only's train then compiles the training kernels itself)

Random weights never emit EOS, so every answer runs to 512 tokens (the base
model's case at 7B; a tuned model stops earlier). The two phases may run in
separate invocations on one machine (--work keeps the first phase's outputs);
both write into <out>/<card>-<date>-<tag>.json (--tag, experiment-stages by default):
`exp_wall_s_by_stage` ({"first": {stage: s}, "lr_only": {stage: s}}),
`lr_only_eval_share` (evaluate + benchmark over train, lr_only), and
`exp_wall_s_by_stage_before`: the same experiments as the pipeline ran them
before the base model had stages of its own, when evaluate and benchmark
computed both models in one process each, taken from these stage times
(evaluate_base + evaluate, benchmark_base + benchmark: an upper bound, by one
model load each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from benchmark_stage import leaderboard_tasks  # noqa: E402
from gpu_qlora import build_model, stage, write_params  # noqa: E402

from sabia_ift.config import merge  # noqa: E402

PAIRS = (("evaluate_base", "evaluate"), ("benchmark_base", "benchmark"))


def experiment_params(args: argparse.Namespace, work: Path, phase: str, extra: dict | None = None) -> Path:
    """The phase's params file: the preset, the random 7B as the base, the realistic rows, the local
    leaderboard files (args: rows, tokenizer, pt_eval, work, limit, lr), then `extra`'s overrides."""
    model_dir = args.work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    overrides = {
        "base": {"source": "pretrained", "name_or_path": str(model_dir)},
        "fetch": {"source": "file", "path": str(args.rows.resolve()), "max_rows": None},
        "format": {"val_size": 50, "test_size": 300},
        "train": {"report_to": [], "devices": 1},
        "benchmark": {"tasks": leaderboard_tasks(args.pt_eval.resolve()), "limit": args.limit},
    }
    if phase == "lr_only":
        overrides["train"]["lr"] = args.lr
    return write_params(work / f"params-{phase}.yaml", merge(overrides, extra or {}))


def experiment_paths(work: Path) -> dict[str, Path]:
    return {n: work / n for n in ("base", "raw", "formatted", "tokenized", "eval-base", "benchmark-base.json")}


def data_stages(paths: dict[str, Path], work: Path) -> list[tuple[str, ...]]:
    """base, fetch, format and tokenize with their paths (experiment_paths), as dvc.yaml runs them."""
    return [("base", "--out", str(paths["base"])),
            ("fetch", "--out", str(paths["raw"])),
            ("format", "--raw", str(paths["raw"]), "--out", str(paths["formatted"]), "--metrics",
             str(work / "format.json")),
            ("tokenize", "--base", str(paths["base"]), "--formatted", str(paths["formatted"]), "--out",
             str(paths["tokenized"]), "--metrics", str(work / "tokenize.json"))]


def evaluate_base_cli(paths: dict[str, Path], out: Path) -> tuple[str, ...]:
    return ("--base", str(paths["base"]), "--formatted", str(paths["formatted"]), "--tokenized",
            str(paths["tokenized"]), "--out", str(out))


def benchmark_base_cli(paths: dict[str, Path], out: Path) -> tuple[str, ...]:
    return ("--base", str(paths["base"]), "--out", str(out))


def experiment_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options experiment_params reads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--pt-eval", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lr", type=float, default=3e-4, help="train.lr of the lr_only experiment")
    p.add_argument("--limit", type=int, default=40, help="benchmark examples a task")
    return p


def main() -> None:
    p = experiment_arguments(__doc__)
    p.add_argument("--phase", choices=["first", "lr_only", "base"], required=True,
                   help="base: only what lr_only reads (the data stages and the base model's two), for a "
                        "short device run; lr_only's train then pays the first kernel compilations")
    p.add_argument("--tag", default="experiment-stages", help="suffix of the results file name")
    args = p.parse_args()

    import torch

    work = args.work / "experiment"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    path = args.out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-{args.tag}.json"
    result = json.loads(path.read_text()) if path.is_file() else {
        "card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "limit": args.limit,
        "exp_wall_s_by_stage": {}}
    log = args.out / f"{args.tag}.log"
    params = experiment_params(args, work, args.phase)
    paths = experiment_paths(work)
    adapter = work / f"adapter-{args.phase}"
    walls: dict[str, float] = {}

    def run(name: str, *cli: str) -> None:
        walls[name] = round(stage(name, params, work, *cli, log=log), 1)
        result["exp_wall_s_by_stage"][args.phase] = walls
        path.write_text(json.dumps(result, indent=2))
        print(name, walls[name], flush=True)

    if args.phase in ("first", "base"):
        for name, *cli in data_stages(paths, work):
            run(name, *cli)
    if args.phase == "base":
        run("evaluate_base", *evaluate_base_cli(paths, paths["eval-base"]))
        run("benchmark_base", *benchmark_base_cli(paths, paths["benchmark-base.json"]))
        return
    run("train", "--base", str(paths["base"]), "--data", str(paths["tokenized"]), "--out", str(adapter),
        "--checkpoints", str(work / f"ckpt-{args.phase}"), "--metrics", str(work / f"train-{args.phase}.json"),
        "--timings", str(work / f"timings-{args.phase}.json"))
    if args.phase == "first":
        run("evaluate_base", *evaluate_base_cli(paths, paths["eval-base"]))
    run("evaluate", "--base", str(paths["base"]), "--adapter", str(adapter), "--formatted", str(paths["formatted"]),
        "--tokenized", str(paths["tokenized"]), "--base_results", str(paths["eval-base"]), "--samples",
        str(work / f"samples-{args.phase}.jsonl"), "--prompts", str(work / f"prompts-{args.phase}.jsonl"),
        "--metrics", str(work / f"eval-{args.phase}.json"))
    if args.phase == "first":
        run("benchmark_base", *benchmark_base_cli(paths, paths["benchmark-base.json"]))
    run("benchmark", "--base", str(paths["base"]), "--adapter", str(adapter), "--base_results",
        str(paths["benchmark-base.json"]), "--metrics", str(work / f"benchmarks-{args.phase}.json"))

    timings = json.loads((work / f"timings-{args.phase}.json").read_text())
    result.setdefault("train_tokens_per_s", {})[args.phase] = timings.get("steady_input_tokens_per_s")
    by = result["exp_wall_s_by_stage"]
    if "lr_only" in by:
        lr = by["lr_only"]
        result["lr_only_eval_share"] = round((lr["evaluate"] + lr["benchmark"]) / lr["train"], 3)
    first = by.get("first") or by.get("base")
    if first:
        # Before: one evaluate and one benchmark stage computed both models in every experiment.
        base_of = {tuned: first[base] for base, tuned in PAIRS}
        result["exp_wall_s_by_stage_before"] = {
            phase: {name: round(s + base_of.get(name, 0.0), 1) for name, s in stages.items()
                    if name not in dict(PAIRS)}
            for phase, stages in by.items()}
        if "lr_only" in by:
            before = result["exp_wall_s_by_stage_before"]["lr_only"]
            result["lr_only_eval_share_before"] = round((before["evaluate"] + before["benchmark"])
                                                        / before["train"], 3)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
