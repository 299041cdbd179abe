"""QLoRA of a LLaMA-7B-architecture model on one CUDA GPU, through the pipeline's own stages.

Builds a LLaMA-7B model (hidden 4,096, 32 layers, 32 heads, intermediate
11,008, vocab 32,000) with random weights, saves it with save_pretrained, and
runs the project's stage scripts on it exactly as dvc.yaml does (base with a
local folder, fetch, format, tokenize, train in 4-bit, evaluate), with the
Sabiá-7B preset's settings and a few overrides (steps, batch). Random weights
cost the same time and memory as Sabiá's, and need no download.

Timed runs:
  realistic-mb8   rows with a real Portuguese length mix (bench/pt_eval_rows.py), micro-batch 8,
                  length-grouped batches (the preset); -unsorted: random batches; -paged8bit:
                  paged 8-bit AdamW
  fixed2048-mb1   every row exactly 2,048 tokens, micro-batch 1
  fixed2048-mb8   every row exactly 2,048 tokens, micro-batch 8 (the seed report's shape)
then the evaluate stage on a few test prompts with the realistic run's adapter.

    python bench/gpu_qlora.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer --work /tmp/bench --out results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sabia_ift.config import merge  # noqa: E402

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def build_model(folder: Path, tokenizer_dir: Path) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    if (folder / "config.json").is_file():
        return 0.0
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(folder), max_shard_size="4GB")
    LlamaTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def fixed_length_data(tokenized: Path, out: Path, length: int, rows: int, prompt_tokens: int) -> None:
    """Rows of exactly `length` real tokens (the bench rows end to end); loss on all but the first `prompt_tokens`."""
    import datasets

    train = datasets.load_from_disk(str(tokenized))["train"]
    stream = [t for ids in train["input_ids"] for t in ids]
    while len(stream) < length * rows:
        stream += stream
    ids = [stream[i * length:(i + 1) * length] for i in range(rows)]
    labels = [[-100] * prompt_tokens + r[prompt_tokens:] for r in ids]
    split = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [length] * rows})
    datasets.DatasetDict({"train": split, "validation": split.select(range(8)), "test": split.select(range(8))}) \
        .save_to_disk(str(out))


def stage(name: str, params: Path, work: Path, *args: str, log: Path, cap_gib: float | None = None) -> float:
    """Run one stage script as dvc.yaml would (under bench/memory_cap.py with `cap_gib`); returns its wall time."""
    start = time.perf_counter()
    cap = [str(REPO / "bench" / "memory_cap.py"), str(cap_gib)] if cap_gib else []
    cmd = [sys.executable, *cap, "-m", f"stages.{name}", "--params", str(params), *args]
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"stage {name} failed ({code}); see {log}")
    return time.perf_counter() - start


def prepare_data(params: Path, work: Path, log: Path, tokenized: str = "data/tokenized") -> tuple[Path, Path]:
    """The base, fetch, format and tokenize stages, as dvc.yaml runs them; returns (models/base, tokenized)."""
    base, raw, formatted, out = (work / n for n in ("models/base", "data/raw", "data/formatted", tokenized))
    stage("base", params, work, "--out", str(base), log=log)
    stage("fetch", params, work, "--out", str(raw), log=log)
    stage("format", params, work, "--raw", str(raw), "--out", str(formatted), "--metrics", str(work / "format.json"),
          log=log)
    stage("tokenize", params, work, "--base", str(base), "--formatted", str(formatted), "--out", str(out),
          "--metrics", str(work / "tokenize.json"), log=log)
    return base, out


def write_params(path: Path, overrides: dict) -> Path:
    # The preset holds only its differences from the embedded default.
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                   yaml.safe_load((REPO / "presets" / "sabia-7b.yaml").read_text()))
    params = merge(params, overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="instruction/input/output JSONL")
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="folder with a 32k LLaMA-style sentencepiece tokenizer.model")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated run names to do (default: all)")
    args = parser.parse_args()

    import torch

    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stages.log"
    results: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d"), "runs": {}}
    import bitsandbytes
    import peft
    import transformers  # noqa: E401 - versions for the record
    results["versions"] = {m.__name__: m.__version__ for m in (transformers, peft, bitsandbytes)}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    model_dir = work / "llama-7b-random"
    results["build_and_save_s"] = round(build_model(model_dir, args.tokenizer), 1)
    save()

    common = {
        "base": {"source": "pretrained", "name_or_path": str(model_dir)},
        "fetch": {"source": "file", "path": str(args.rows), "max_rows": None},
        "format": {"val_size": 16, "test_size": 16},
        # The configuration these runs measured before packing existed (2026-11-25 in BENCHMARKS.md):
        # padded micro-batches of rows, non-reentrant checkpointing, no fused kernels, one GPU.
        "train": {"max_steps": args.steps, "logging_steps": 5, "eval_steps": 100000, "save_steps": 100000,
                  "report_to": [], "packing": False, "gradient_checkpointing": "on", "kernels": "none",
                  "grad_accum": 1, "devices": 1},
        "evaluate": {"max_samples": 8, "max_new_tokens": 64, "batch_size": 8, "samples_to_write": 8},
    }
    params = write_params(work / "params.yaml", common)
    base, tokenized = prepare_data(params, work, log)
    formatted = work / "data/formatted"
    results["tokenize"] = json.loads((work / "tokenize.json").read_text())["train"]
    save()

    fixed = work / "data/tokenized-2048"
    fixed_length_data(tokenized, fixed, 2048, rows=8 * (args.steps + 2), prompt_tokens=256)

    runs = {
        "realistic-mb8": (tokenized, {"micro_batch_size": 8}),
        "realistic-mb8-unsorted": (tokenized, {"micro_batch_size": 8, "group_by_length": False}),
        "realistic-mb8-paged8bit": (tokenized, {"micro_batch_size": 8, "optim": "paged_adamw_8bit"}),
        "fixed2048-mb1": (fixed, {"micro_batch_size": 1, "group_by_length": False}),
        "fixed2048-mb8": (fixed, {"micro_batch_size": 8, "group_by_length": False}),
    }
    only = set(filter(None, args.only.split(",")))
    for name, (data, overrides) in runs.items():
        if only and name not in only:
            continue
        run_params = write_params(work / f"params-{name}.yaml", {**common, "train": {**common["train"], **overrides}})
        adapter, metrics, timings = work / f"adapter-{name}", work / f"train-{name}.json", work / f"time-{name}.json"
        wall = stage("train", run_params, work, "--base", str(base), "--data", str(data), "--out", str(adapter),
                     "--checkpoints", str(work / f"ckpt-{name}"), "--metrics", str(metrics),
                     "--timings", str(timings), log=log)
        m = {**json.loads(metrics.read_text()), **json.loads(timings.read_text())}
        m["stage_wall_s"] = round(wall, 1)
        results["runs"][name] = m
        save()

    if not only or "evaluate" in only:
        eval_params = write_params(work / "params-eval.yaml", common)
        base_wall = stage("evaluate_base", eval_params, work, "--base", str(base), "--formatted", str(formatted),
                          "--tokenized", str(tokenized), "--out", str(work / "eval-base"), log=log)
        wall = stage("evaluate", eval_params, work, "--base", str(base),
                     "--adapter", str(work / "adapter-realistic-mb8"),
                     "--formatted", str(formatted), "--tokenized", str(tokenized),
                     "--base_results", str(work / "eval-base"), "--samples", str(out / "samples.jsonl"),
                     "--prompts", str(work / "eval_prompts.jsonl"), "--metrics", str(work / "eval.json"), log=log)
        results["evaluate"] = {**json.loads((work / "eval.json").read_text()), "stage_wall_s": round(wall, 1),
                               "base_stage_wall_s": round(base_wall, 1)}
        save()

    print(f"\n{results['card']}  torch {results['torch']}  {results['versions']}")
    print(f"{'run':16} {'peak GiB':>9} {'rsrv GiB':>9} {'step s':>8} {'in tok/s':>9} {'trained tok/s':>14} "
          f"{'params':>12} {'%':>6}")
    for name, m in results["runs"].items():
        print(f"{name:16} {m['peak_memory_gib']:9.2f} {m['peak_reserved_gib']:9.2f} {m['step_time_s']:8.3f} "
              f"{m['steady_input_tokens_per_s']:9.0f} {m['steady_trained_tokens_per_s']:14.0f} "
              f"{m['trainable_params']:12,d} {100 * m['trainable_params'] / m['total_params']:6.3f}")
    if "evaluate" in results:
        e = results["evaluate"]
        print(f"evaluate: {e['samples']} prompts, stage {e['stage_wall_s']} s, "
              f"tuned eos_stop {e['tuned']['eos_stop_rate']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
