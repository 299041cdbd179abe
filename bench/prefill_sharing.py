"""How much of the benchmark stage's prefill a shared few-shot block saves, on the leaderboard's real prompts.

    python bench/prefill_sharing.py --pt-eval ../shared/pt-eval --tokenizer .bench/tokenizer --out bench/results \
        [--rows 8,32,64]

No model and no GPU: lm-eval builds every task's prompts exactly as the
benchmark stage does (the Sabiá-7B preset's five tasks from the publishers'
files, every example, the leaderboard's few-shot examples), a recording model
takes the generate_until requests, and the 32k LLaMA tokenizer counts their
tokens. Each task's prompts are then batched as the fast engine batches them
(one task at a time, sorted by length, `rows` a batch, padding rows included)
and the prefill's token positions are counted two ways: every row over its
whole left-padded prompt, and the beginning all of a batch's prompts share
(decoding.shared_prefix) once, then every row over its own rest. Every
projection and MLP of the prefill costs the same per token position, so the
ratio is the share of the prefill's matrix work that remains.

Writes <out>/<machine>-<date>-prefill-sharing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from benchmark_stage import leaderboard_tasks  # noqa: E402
from repro_check import cpu_summary  # noqa: E402


def recorded_prompts(pt: Path) -> dict[str, list[str]]:
    """Task name -> the generate_until contexts lm-eval asks of the model, every example."""
    from lm_eval.api.model import LM

    from sabia_ift.config import section_from_params
    from sabia_ift.evaluation.benchmark import evaluate_tasks, prepare_tasks

    prompts: dict[str, list[str]] = {}

    class Recorder(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            for request in requests:
                prompts.setdefault(request.task_name, []).append(request.args[0])
            return [""] * len(requests)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [0.0] * len(requests)

    cfg = section_from_params("benchmark", {"tasks": leaderboard_tasks(pt), "limit": None}, REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as work:
        prepared = prepare_tasks(cfg, work, root=REPO)
        evaluate_tasks(Recorder(), list(prepared), work, limit=None, seed=cfg.seed)
    return prompts


def prefill_positions(lengths_and_ids: list[list[int]], rows: int) -> tuple[int, int]:
    """(positions without sharing, with sharing) for one task's prompts in batches of `rows`."""
    from sabia_ift.evaluation import decoding

    ordered = sorted(lengths_and_ids, key=len)
    plain = shared_total = 0
    for start in range(0, len(ordered), rows):
        batch = ordered[start:start + rows]
        width = max(map(len, batch))
        shared = decoding.shared_prefix(batch) if len(batch) > 1 else 0
        shared = shared if shared >= decoding.MIN_SHARED else 0
        plain += rows * width
        shared_total += shared + rows * (width - shared)
    return plain, shared_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt-eval", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with a 32k LLaMA tokenizer.model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="8,32,64", help="batch sizes (rows a batch) to count at")
    args = parser.parse_args()

    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(args.tokenizer))
    prompts = recorded_prompts(args.pt_eval.resolve())
    ids = {task: tokenizer(texts)["input_ids"] for task, texts in prompts.items()}
    from sabia_ift.evaluation import decoding

    tasks = {}
    for task, encoded in ids.items():
        entry = {"prompts": len(encoded), "prompt_tokens": sum(map(len, encoded)),
                 "mean_prompt_tokens": round(sum(map(len, encoded)) / len(encoded), 1),
                 "shared_by_all": decoding.shared_prefix(encoded), "by_rows": {}}
        for rows in map(int, args.rows.split(",")):
            plain, shared = prefill_positions(encoded, rows)
            entry["by_rows"][rows] = {"positions_plain": plain, "positions_shared": shared,
                                      "remaining_share": round(shared / plain, 3)}
        tasks[task] = entry
    totals = {}
    for rows in map(int, args.rows.split(",")):
        plain = sum(t["by_rows"][rows]["positions_plain"] for t in tasks.values())
        shared = sum(t["by_rows"][rows]["positions_shared"] for t in tasks.values())
        totals[rows] = {"positions_plain": plain, "positions_shared": shared,
                        "remaining_share": round(shared / plain, 3)}
    cpu = cpu_summary()
    result = {"cpu": cpu, "date": time.strftime("%Y-%m-%d"), "min_shared": decoding.MIN_SHARED, "tasks": tasks,
              "all_tasks": totals}
    args.out.mkdir(parents=True, exist_ok=True)
    machine = " ".join(cpu["model"].split()[:3]).replace("(R)", "").replace(" ", "-").lower()
    name = f"{machine}-{time.strftime('%Y-%m-%d')}-prefill-sharing.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
