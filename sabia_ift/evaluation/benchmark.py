"""Stage benchmark: lm-evaluation-harness tasks on the base model and on base + adapter.

The task YAMLs in sabia_ift/evaluation/tasks/ hold each task's prompt and
scoring (the Open Portuguese LLM Leaderboard's formats for the built-in
tasks). At run time every task of params' `benchmark.tasks` gets a small YAML
in a temporary folder that includes its template and names its data: rows
written there as JSON Lines by benchmark_data.py, whether they came from a
local file or the Hub. Which rows are scored (`limit`, a seeded sample
stratified by the gold answer) and shown as examples, with duplicates
removed and counted, is sampling.py's choice; lm-eval then reads only local
files and scores every row written. Log-likelihoods come from harness_lm.py,
which keeps only the continuation's logits.

The base is loaded once, with the adapter on top (modeling.load_tuned, as
every stage loads it); the base scores come from the same model object with
the adapter switched off, so both runs see identical weights, prompts and
batches, and a 4-bit base is loaded and quantised once.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import GENERIC_TASKS, BenchmarkConfig, BenchmarkTask
from ..io import write_jsonl
from ..modeling import load_tuned, pick_device
from .benchmark_data import load_task_data
from .sampling import majority_baseline, warn_if_constant_wins

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# The metric each kind is ranked by (the leaderboard's), first in metrics/benchmarks.json.
MAIN_METRIC = {"enem": "acc", "multiple_choice": "acc", "assin2_rte": "f1_macro", "faquad_nli": "f1_macro",
               "tweetsentbr": "f1_macro", "classification": "f1_macro", "assin2_sts": "pearson"}
GENERIC_DESCRIPTION = {
    "multiple_choice": "As perguntas a seguir são de múltipla escolha; responda apenas com a letra "
                       "da única alternativa correta.\n\n",
    "classification": "Classifique cada texto a seguir; responda apenas com uma das opções.\n\n",
}


def template(task: BenchmarkTask) -> Path:
    if task.kind in GENERIC_TASKS:
        return TASKS_DIR / f"{task.kind}_{task.scoring}.yaml"
    return TASKS_DIR / f"{task.kind}.yaml"


def prepare_tasks(cfg: BenchmarkConfig, workdir: str | Path, root: str | Path = ".") -> dict[str, dict]:
    """Write each task's scored rows, few-shot rows and YAML under `workdir`; returns name ->
    {num_fewshot, n_test, source, kind, sample: the keys summarize adds about the rows scored}."""
    workdir = Path(workdir)
    prepared = {}
    for index, task in enumerate(cfg.tasks):
        data = load_task_data(task, index, root=root, seed=cfg.seed, limit=cfg.limit)
        baseline = majority_baseline(task.kind, data.test, MAIN_METRIC[task.kind])
        warn_if_constant_wins(task.name, task.kind, data.test, baseline)
        if data.duplicates_removed or data.fewshot_duplicates_removed:
            log.info("benchmark task %s: %d rows repeat an earlier row and %d a few-shot example: removed",
                     task.name, data.duplicates_removed, data.fewshot_duplicates_removed)
        folder = workdir / task.name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "test.jsonl", data.test)
        files = {"test": str(folder / "test.jsonl")}
        if data.fewshot:
            write_jsonl(folder / "fewshot.jsonl", data.fewshot)
            files["train"] = str(folder / "fewshot.jsonl")
        spec: dict[str, Any] = {
            "include": str(template(task)),
            "task": task.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "num_fewshot": len(data.fewshot),
        }
        if task.scoring == "generate":
            # Greedy, one line: every answer here is a letter, a label or a number.
            spec["generation_kwargs"] = {"until": ["\n"], "do_sample": False, "max_gen_toks": cfg.max_gen_toks}
        if data.fewshot:
            spec["fewshot_split"] = "train"
            spec["fewshot_config"] = {"sampler": "first_n"}
        if task.kind in GENERIC_TASKS:
            spec["description"] = task.description or GENERIC_DESCRIPTION[task.kind]
        (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False),
                                                   encoding="utf-8")
        # What a constant answer scores on the same rows (null for Pearson), and what the draw left out.
        sample = {"majority_baseline": baseline, "n_available": data.available,
                  "n_duplicates_removed": data.duplicates_removed,
                  "n_fewshot_duplicates_removed": data.fewshot_duplicates_removed}
        prepared[task.name] = {"num_fewshot": len(data.fewshot), "n_test": len(data.test),
                               "source": data.source, "kind": task.kind, "sample": sample}
    return prepared


def make_lm(model, tokenizer, batch_size: int | str, max_length: int | None):
    """An lm-eval model around an already-loaded (Peft)model."""
    from .harness_lm import ContinuationHFLM

    return ContinuationHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate_tasks(lm, names: list[str], include_path: str | Path, *, limit: int | None, seed: int,
                   log_samples: bool = False) -> dict:
    """lm-eval's results for the tasks in `include_path`, as `lm_eval.simple_evaluate` returns them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=log_samples,
        bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def _score(results: dict, name: str, metric: str) -> float | None:
    value = results["results"][name].get(f"{metric},none")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None  # e.g. Pearson of constant answers: undefined, not zero
    return round(float(value), 4)


def summarize(prepared: dict[str, dict], base: dict, tuned: dict) -> dict[str, dict]:
    metrics = {}
    for name, info in prepared.items():
        metric = MAIN_METRIC[info["kind"]]
        b, t = _score(base, name, metric), _score(tuned, name, metric)
        n = base.get("n-samples", {}).get(name, {}).get("effective", info["n_test"])
        metrics[name] = {
            "metric": metric, "base": b, "tuned": t,
            "delta": round(t - b, 4) if b is not None and t is not None else None,
            "n": n, "num_fewshot": info["num_fewshot"], **info["sample"],
        }
    return metrics


def run_benchmark(cfg: BenchmarkConfig, base_dir: str | Path, adapter_dir: str | Path, *,
                  root: str | Path = ".", log_samples: bool = False) -> tuple[dict, dict]:
    """(metrics per task, lm-eval's raw results {"base": ..., "tuned": ...})."""
    if not cfg.tasks:
        return {}, {}
    device = pick_device(cfg.device, "benchmark.device")
    with tempfile.TemporaryDirectory(prefix="sabia-benchmark-") as workdir:
        prepared = prepare_tasks(cfg, workdir, root)
        tokenizer, model = load_tuned(base_dir, adapter_dir, device)
        model.eval()
        lm = make_lm(model, tokenizer, cfg.batch_size, getattr(model.config, "max_position_embeddings", None))
        names = list(prepared)
        start = time.perf_counter()
        # prepare_tasks wrote only the rows to score: no limit for lm-eval (it would take the first ones).
        with model.disable_adapter():
            base = evaluate_tasks(lm, names, workdir, limit=None, seed=cfg.seed, log_samples=log_samples)
        tuned = evaluate_tasks(lm, names, workdir, limit=None, seed=cfg.seed, log_samples=log_samples)
        log.info("benchmark: %d tasks, base and tuned, in %.1f s", len(names), time.perf_counter() - start)
    return summarize(prepared, base, tuned), {"base": base, "tuned": tuned}
