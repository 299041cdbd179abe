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

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..artifacts import check_loading
from ..config import GENERIC_TASKS, BenchmarkConfig, BenchmarkTask
from ..errors import DataError
from ..io import write_json, write_jsonl
from ..modeling import load_base, load_tuned, pick_device
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


def make_lm(model, tokenizer, batch_size: int | str, max_length: int | None, *, fast: bool = False):
    """An lm-eval model around an already-loaded (Peft)model; with `fast`, `model` is a plain copy
    (generation.inference_copy) and greedy answers come from the evaluate stage's fast engine."""
    from .harness_lm import ContinuationHFLM

    lm = ContinuationHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    lm.fast_generation = fast
    return lm


def evaluate_tasks(lm, names: list[str], include_path: str | Path, *, limit: int | None, seed: int,
                   log_samples: bool = False) -> dict:
    """lm-eval's results for the tasks in `include_path` ("results", "samples", "n-samples", ...).

    What `lm_eval.simple_evaluate` does for a ready model, without its last step: that one
    records the environment (torch's collect_env runs pip and nvidia-smi in subprocesses,
    1 to 2 s a call, twice a stage), which nothing here reads.
    """
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import set_torch_seed

    random.seed(seed)
    np.random.seed(seed)
    set_torch_seed(seed)
    loaded = TaskManager(include_path=str(include_path), include_defaults=False).load(names)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples, bootstrap_iters=0)


def _score(results: dict, name: str, metric: str) -> float | None:
    value = results["results"][name].get(f"{metric},none")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None  # e.g. Pearson of constant answers: undefined, not zero
    return round(float(value), 4)


def model_record(prepared: dict[str, dict], results: dict) -> dict[str, dict]:
    """One model's results per task, as benchmark_base writes them: the main metric's score, the
    items scored, and each item's result (lm-eval's per-sample value of that metric: 0/1 for acc,
    [gold, answer] for F1 and Pearson), identified by lm-eval's doc id and document and prompt hashes."""
    record = {}
    for name, info in prepared.items():
        metric = MAIN_METRIC[info["kind"]]
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        record[name] = {
            "metric": metric, "score": _score(results, name, metric),
            "n": results.get("n-samples", {}).get(name, {}).get("effective", info["n_test"]),
            "items": [{"doc_id": s["doc_id"], "doc_hash": s["doc_hash"], "prompt_hash": s["prompt_hash"],
                       "value": s[metric]} for s in samples],
        }
    return record


def _item_keys(items: list[dict]) -> list[tuple]:
    return [(i["doc_id"], i["doc_hash"], i["prompt_hash"]) for i in items]


def summarize(prepared: dict[str, dict], base: dict[str, dict], tuned: dict[str, dict], *,
              where: str = "the base results") -> dict[str, dict]:
    """metrics/benchmarks.json from two model records (model_record): each task's scores, delta and
    the delta's paired test (significance.benchmark_test) over the items both models scored."""
    from ..significance import benchmark_test

    metrics = {}
    for name, info in prepared.items():
        if name not in base:
            raise DataError(f"{where}: no task {name}; rerun the benchmark_base stage")
        b, t = base[name], tuned[name]
        if _item_keys(b["items"]) != _item_keys(t["items"]):
            raise DataError(f"{where}: task {name}'s items or prompts are not the ones scored now "
                            "(its data or params changed); rerun the benchmark_base stage")
        delta = round(t["score"] - b["score"], 4) if b["score"] is not None and t["score"] is not None else None
        metrics[name] = {
            "metric": b["metric"], "base": b["score"], "tuned": t["score"], "delta": delta,
            **benchmark_test(b["metric"], [i["value"] for i in b["items"]], [i["value"] for i in t["items"]]),
            "n": b["n"], "num_fewshot": info["num_fewshot"], **info["sample"],
        }
    return metrics


def _score_model(cfg: BenchmarkConfig, model, tokenizer, workdir: str | Path, names: list[str], device: str) -> dict:
    from .generation import adapter_enabled, inference_copy, pick_engine, release_copies

    max_length = getattr(model.config, "max_position_embeddings", None)
    engine = pick_engine(model, device) if cfg.engine == "auto" else cfg.engine
    # prepare_tasks wrote only the rows to score: no limit for lm-eval (it would take the first ones).
    if engine != "fast":
        return evaluate_tasks(make_lm(model, tokenizer, cfg.batch_size, max_length), names, workdir, limit=None,
                              seed=cfg.seed, log_samples=True)
    # Log-likelihoods and answers both from the plain copy (the adapter merged where it is on).
    plain = inference_copy(model, merge=adapter_enabled(model))
    try:
        lm = make_lm(plain, tokenizer, cfg.batch_size, max_length, fast=True)
        return evaluate_tasks(lm, names, workdir, limit=None, seed=cfg.seed, log_samples=True)
    finally:
        del plain
        release_copies()  # the copy must not sit beside the next model's


def benchmark_base(cfg: BenchmarkConfig, loading: dict[str, Any], base_dir: str | Path, out: str | Path, *,
                   root: str | Path = ".") -> dict[str, dict]:
    """The base model's half of the benchmark stage, written to `out` (model_record's JSON). Needs no
    adapter: an experiment that changes only the training reads it instead of scoring the base again."""
    record: dict[str, dict] = {}
    if cfg.tasks:
        device = pick_device(cfg.device, "benchmark.device")
        with tempfile.TemporaryDirectory(prefix="sabia-benchmark-") as workdir:
            prepared = prepare_tasks(cfg, workdir, root)
            tokenizer, model = load_base(base_dir, device, **loading)
            model.eval()
            start = time.perf_counter()
            record = model_record(prepared, _score_model(cfg, model, tokenizer, workdir, list(prepared), device))
            log.info("benchmark base: %d tasks in %.1f s", len(prepared), time.perf_counter() - start)
    write_json(out, {"loading": loading, "tasks": record})
    return record


def run_benchmark(cfg: BenchmarkConfig, base_dir: str | Path, adapter_dir: str | Path, *,
                  base_results: str | Path | None = None, root: str | Path = ".") -> tuple[dict, dict]:
    """(metrics per task, lm-eval's raw results {"tuned": ..., and "base": ... where scored here}).

    The base's results come from `base_results` (benchmark_base's file) when given; without it
    they are scored here, from the same model object with the adapter switched off.
    """
    if not cfg.tasks:
        return {}, {}
    device = pick_device(cfg.device, "benchmark.device")
    where = str(base_results) if base_results is not None else "the base results"
    stored = None
    with tempfile.TemporaryDirectory(prefix="sabia-benchmark-") as workdir:
        # The task files first: a bad row is the user's to fix whatever else is missing.
        prepared = prepare_tasks(cfg, workdir, root)
        if base_results is not None:
            stored = read_base_results(base_results)
            check_loading(adapter_dir, stored.get("loading") or {}, where)
        tokenizer, model = load_tuned(base_dir, adapter_dir, device)
        model.eval()
        names = list(prepared)
        start = time.perf_counter()
        raw = {}
        if stored is None:
            with model.disable_adapter():
                raw["base"] = _score_model(cfg, model, tokenizer, workdir, names, device)
        raw["tuned"] = _score_model(cfg, model, tokenizer, workdir, names, device)
        log.info("benchmark: %d tasks, %s in %.1f s", len(names), "tuned" if stored else "base and tuned",
                 time.perf_counter() - start)
    base = stored["tasks"] if stored is not None else model_record(prepared, raw["base"])
    return summarize(prepared, base, model_record(prepared, raw["tuned"]), where=where), raw


def read_base_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no base results; run the benchmark_base stage first (dvc repro benchmark_base)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rerun the benchmark_base stage") from None
