"""The benchmark stage (lm-evaluation-harness, base and tuned) on one CUDA card, on the leaderboard's task set.

    python bench/benchmark_stage.py --pt-eval ../shared/pt-eval --tokenizer .bench/tokenizer --work /tmp/bench \
        --out DIR [--limit 250] [--engine auto|fast|hf] [--base-only [--hf-limit N]]

Builds the random LLaMA-7B folder (bench/gpu_qlora.py), trains a 3-step QLoRA
adapter with the stage script, then runs the benchmark stage script with the
Sabiá-7B preset's tasks read from local copies of the publishers' files
(ENEM 2022, ASSIN 2, FaQuAD, TweetSentBR), `batch_size: auto`, 4-bit base
loaded once for base and tuned. Writes <out>/<card>-<date>-benchmark-stage.json
with the stage's wall time and metrics.

--base-only runs the benchmark_base stage alone: every task for one model, the
leaderboard's cost per model. --hf-limit N then runs it again in the same
invocation with `engine: hf` (the 4-bit model through lm-eval's own batches) on
N examples a task, for the rate of the path the fast engine replaced.
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
from gpu_qlora import build_model, prepare_data, stage, write_params  # noqa: E402


def leaderboard_tasks(pt: Path) -> list[dict]:
    """The Sabiá-7B preset's five tasks, read from local copies of the publishers' files in `pt`."""
    return [
        {"name": "enem", "kind": "enem", "path": str(pt / "enem2022.json")},
        {"name": "assin2_rte", "kind": "assin2_rte", "path": str(pt / "assin2-test.xml"),
         "fewshot_path": str(pt / "assin2-train-only.xml")},
        {"name": "assin2_sts", "kind": "assin2_sts", "path": str(pt / "assin2-test.xml"),
         "fewshot_path": str(pt / "assin2-train-only.xml")},
        {"name": "faquad_nli", "kind": "faquad_nli", "path": str(pt / "faquad_dev.json"),
         "fewshot_path": str(pt / "faquad_train.json")},
        {"name": "tweetsentbr", "kind": "tweetsentbr", "path": str(pt / "tweetsentbr_poeta750.json")},
    ]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt-eval", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "hf"], help="benchmark.engine")
    parser.add_argument("--base-only", action="store_true", help="the benchmark_base stage alone (one model)")
    parser.add_argument("--hf-limit", type=int, default=None,
                        help="with --base-only: again with engine hf on this many examples a task")
    args = parser.parse_args()

    import torch

    work, out, pt = args.work, args.out, args.pt_eval.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "benchmark-stage.log"
    model_dir = work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    tasks = leaderboard_tasks(pt)
    overrides = {
        "base": {"source": "pretrained", "name_or_path": str(model_dir)},
        "fetch": {"source": "file", "path": str(REPO / "data/sample/instructions.jsonl"), "max_rows": 200},
        "format": {"val_size": 8, "test_size": 8},
        "train": {"max_steps": 3, "logging_steps": 1, "eval_steps": 100000, "save_steps": 100000,
                  "report_to": [], "devices": 1},
        "benchmark": {"tasks": tasks, "limit": args.limit, "engine": args.engine},
    }
    params = write_params(work / "params-benchmark.yaml", overrides)
    base, tokenized = prepare_data(params, work, log, tokenized="data/tokenized-bm")
    card = torch.cuda.get_device_name(0)
    name = f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-benchmark-stage"
    result: dict = {"card": card, "date": time.strftime("%Y-%m-%d"), "limit": args.limit, "engine": args.engine}
    if args.base_only:
        wall = stage("benchmark_base", params, work, "--base", str(base), "--out", str(work / "benchmark-base.json"),
                     log=log)
        tasks_out = json.loads((work / "benchmark-base.json").read_text())["tasks"]
        n = sum(t["n"] for t in tasks_out.values())
        result.update(base_stage_wall_s=round(wall, 1), examples=n, examples_per_s=round(n / wall, 2),
                      scores={k: t["score"] for k, t in tasks_out.items()},
                      n_by_task={k: t["n"] for k, t in tasks_out.items()})
        print(json.dumps(result), flush=True)
        (out / f"{name}-base.json").write_text(json.dumps(result, indent=2))  # kept if the hf run is cut short
        if args.hf_limit:
            hf = write_params(work / "params-benchmark-hf.yaml",
                              {**overrides, "benchmark": {"tasks": tasks, "limit": args.hf_limit, "engine": "hf"}})
            hf_wall = stage("benchmark_base", hf, work, "--base", str(base), "--out", str(work / "bm-base-hf.json"),
                            log=log)
            hf_tasks = json.loads((work / "bm-base-hf.json").read_text())["tasks"]
            hf_n = sum(t["n"] for t in hf_tasks.values())
            result["hf"] = {"limit": args.hf_limit, "base_stage_wall_s": round(hf_wall, 1), "examples": hf_n,
                            "examples_per_s": round(hf_n / hf_wall, 2)}
        (out / f"{name}-base.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=1))
        return
    adapter = work / "adapter-benchmark"
    stage("train", params, work, "--base", str(base), "--data", str(tokenized), "--out", str(adapter),
          "--checkpoints", str(work / "ckpt-bm"), "--metrics", str(work / "m.json"), "--timings",
          str(work / "tm.json"), log=log)
    base_wall = stage("benchmark_base", params, work, "--base", str(base), "--out", str(work / "benchmark-base.json"),
                      log=log)
    wall = stage("benchmark", params, work, "--base", str(base), "--adapter", str(adapter), "--base_results",
                 str(work / "benchmark-base.json"), "--metrics", str(work / "benchmarks.json"), log=log)
    # stage_wall_s: both models, as the one stage took before the base had a stage of its own.
    result.update(stage_wall_s=round(base_wall + wall, 1), base_stage_wall_s=round(base_wall, 1),
                  tuned_stage_wall_s=round(wall, 1), metrics=json.loads((work / "benchmarks.json").read_text()))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
