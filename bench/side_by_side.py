"""QLoRA of a LLaMA-7B-architecture model, this project beside its peers, in one run on one CUDA card.

    python bench/side_by_side.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer --work /tmp/bench \
        --out bench/results [--only NAME,...] [--steps 12] [--caps 6,8,12,16 [--cap-tokens 2048,16384] [--cap-lora all]]
        [--curve-steps 200]

Same random LLaMA-7B folder (bench/gpu_qlora.py builds it), same LoRA shape
(r=32, alpha 64, dropout 0 on q/k/v), NF4 + double quantization, bf16:

  hf-mb8               the common HF+PEFT recipe (prepare_model_for_kbit_training), checkpointing, 8 x 2,048
  unsloth-ckpt-mb8     Unsloth with its own (offloading) checkpointing, 8 x 2,048
  unsloth-ckpt-mb1     Unsloth, checkpointing, 1 x 2,048
  unsloth-nockpt-mb8   Unsloth without checkpointing, 8 x 2,048 (recorded as failed if it does not fit)
  ours-fast            this project's train stage, fast: packed, no checkpointing, Liger, 4 x 2,048 x 2 accumulation
  ours-fast16          the same with 8 x 2,048 in one micro-batch
  ours-fast16-fp8      ours-fast16 with the frozen base's products in FP8 (train.base_matmul: fp8)
  ours-lowmem          the train stage, low memory: packed, checkpointing with offload, Liger, 8 x 2,048
  ours-mb1             the train stage, low-memory settings at 1 x 2,048
  ours-realistic-packed    the fast configuration on real Portuguese rows (FaQuAD/ENEM mix)
  ours-realistic-unpacked  the same rows, padded micro-batches of 8 rows, length-grouped
  ours-fast16-all, ours-lowmem-all, unsloth-nockpt-mb8-all, unsloth-ckpt-mb8-all
                       the same with LoRA r=16, alpha 32 on all seven projections (q, k, v, o, gate,
                       up, down), where Unsloth's fused MLP and output-projection kernels run
Only when named in --only:
  unsloth-nockpt-mb4   Unsloth without checkpointing, micro-batch 4 x 2 accumulation
  ours-mb1-recompute   ours-mb1 with checkpointing "on" (layer inputs stay on the card); ours-mb1-nockpt: none
  ours-fast16-peft     ours-fast16 with peft's own LoRA forward (train.fused_lora: false)
  ours-realistic-unpacked-peft  ours-realistic-unpacked with peft's own LoRA forward
  ours-fast-unfused    ours-fast without Liger and without the fused LoRA: the GPU check that the fast
                       paths train the same model (same first losses within bf16 noise)
  ours-curve-dense, ours-curve-fp8
                       ours-fast16 without and with FP8 on the realistic rows for --curve-steps steps,
                       a train loss logged every 10: `fp8_loss` compares the two curves step by step
  ours-profile         the fast configuration's model (8 x 2,048, bf16 autocast as in the Trainer) in a plain
                       loop under torch.profiler (top kernels); ours-profile-lowmem: the same with offload

Peers run in bench/peers.py (a fresh process each, same plain loop); this
project's rows run the real stage scripts (as dvc.yaml does). With --caps, each
simulated card (bench/memory_cap.py: one per-process CUDA memory cap for both
tools) trains the low-memory settings and Unsloth's checkpointed mode at each
--cap-tokens (with --cap-lora all, LoRA r=16 on all seven projections for both); the rows land
in `sim_card_results`. Writes
<out>/<card>-<date>-side-by-side.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from gpu_qlora import build_model, fixed_length_data, prepare_data, stage, write_params  # noqa: E402
from repro_check import cpu_summary  # noqa: E402

LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}
LORA_ALL = {"r": 16, "alpha": 32, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
FAST = {"packing": True, "micro_batch_tokens": 8192, "grad_accum": 2, "gradient_checkpointing": "off",
        "kernels": "liger", "fused_lora": True, "attention": "auto"}
LOWMEM = {"packing": True, "micro_batch_tokens": 16384, "grad_accum": 1, "gradient_checkpointing": "offload",
          "kernels": "liger", "fused_lora": True, "attention": "auto"}
FAST16 = {**FAST, "micro_batch_tokens": 16384, "grad_accum": 1}
UNPACKED = {**FAST, "packing": False, "micro_batch_size": 8, "grad_accum": 1, "group_by_length": True}
PEERS = {
    "hf-mb8": ["--tool", "hf", "--micro-batch", "8", "--accum", "1", "--checkpointing", "on"],
    "unsloth-ckpt-mb8": ["--tool", "unsloth", "--micro-batch", "8", "--accum", "1", "--checkpointing", "unsloth"],
    "unsloth-nockpt-mb4": ["--tool", "unsloth", "--micro-batch", "4", "--accum", "2", "--checkpointing", "off"],
    "unsloth-nockpt-mb8": ["--tool", "unsloth", "--micro-batch", "8", "--accum", "1", "--checkpointing", "off"],
    "unsloth-ckpt-mb1": ["--tool", "unsloth", "--micro-batch", "1", "--accum", "1", "--checkpointing", "unsloth"],
    "unsloth-nockpt-mb8-all": ["--tool", "unsloth", "--micro-batch", "8", "--accum", "1", "--checkpointing", "off",
                               "--lora", "all"],
    "unsloth-ckpt-mb8-all": ["--tool", "unsloth", "--micro-batch", "8", "--accum", "1", "--checkpointing", "unsloth",
                             "--lora", "all"],
}


# Measured when named in --only; the default run is the table.
OPTIONAL = {"unsloth-nockpt-mb4", "ours-mb1-recompute", "ours-mb1-nockpt",
            "ours-fast16-peft", "ours-fast-unfused", "ours-realistic-unpacked-peft",
            "ours-profile", "ours-profile-lowmem", "ours-curve-dense", "ours-curve-fp8"}


def peer_env(name: str) -> dict[str, str]:
    """Unsloth runs on the machine's own transformers (the version it supports), not on ours."""
    env = dict(os.environ)
    if name.startswith("unsloth") and "PEER_PYTHONPATH" in env:
        env["PYTHONPATH"] = env["PEER_PYTHONPATH"]
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", default="")
    parser.add_argument("--tag", default="side-by-side", help="suffix of the results file name")
    parser.add_argument("--caps", default="", help="simulated card sizes in GiB, e.g. 6,8,12,16 (none by default)")
    parser.add_argument("--cap-tokens", default="2048,16384", help="tokens a step on each simulated card")
    parser.add_argument("--cap-lora", choices=["qkv", "all"], default="qkv",
                        help="LoRA of the simulated-card rows: r=32 on q/k/v, or r=16 on all seven projections")
    parser.add_argument("--curve-steps", type=int, default=200, help="steps of the FP8 loss-curve rows")
    args = parser.parse_args()

    import torch

    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    stem = f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}"
    path = out / f"{stem}-{args.tag}.json"
    results = json.loads(path.read_text()) if path.is_file() else {"card": card, "runs": {}}
    import peft
    import transformers
    results.update({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                    "date": time.strftime("%Y-%m-%d"), "steps_timed": args.steps,
                    # A step of one row is bound by the host CPU (BENCHMARKS.md): name it beside the card.
                    "host_cpu": cpu_summary()})
    only = set(filter(None, args.only.split(",")))
    log = out / "side-by-side.log"

    def save() -> None:
        summarise(results)
        path.write_text(json.dumps(results, indent=2))

    model_dir = work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    common = {
        "base": {"source": "pretrained", "name_or_path": str(model_dir)},
        "fetch": {"source": "file", "path": str(args.rows), "max_rows": None},
        "format": {"val_size": 16, "test_size": 16},
        "train": {"max_steps": args.steps + 2, "logging_steps": 5, "eval_steps": 100000, "save_steps": 100000,
                  "report_to": [], "lora": LORA, "devices": 1},
    }
    params = write_params(work / "params.yaml", common)
    base, tokenized = work / "models/base", work / "data/tokenized"
    if not (tokenized / "dataset_dict.json").is_file():
        prepare_data(params, work, log)
    fixed = work / "data/tokenized-2048"
    if not (fixed / "dataset_dict.json").is_file():
        fixed_length_data(tokenized, fixed, 2048, rows=8 * (args.steps + 4), prompt_tokens=256)

    ours = {
        "ours-fast": (fixed, FAST),
        "ours-fast16": (fixed, FAST16),
        "ours-fast16-fp8": (fixed, {**FAST16, "base_matmul": "fp8"}),
        "ours-curve-dense": (tokenized, {**FAST16, "max_steps": args.curve_steps, "logging_steps": 10}),
        "ours-curve-fp8": (tokenized, {**FAST16, "max_steps": args.curve_steps, "logging_steps": 10,
                                       "base_matmul": "fp8"}),
        "ours-lowmem": (fixed, LOWMEM),
        "ours-mb1": (fixed, {**LOWMEM, "micro_batch_tokens": 2048}),
        # One row: layer inputs kept on the card (0.5 GiB at 7B) instead of offloaded, and no recompute.
        "ours-mb1-recompute": (fixed, {**LOWMEM, "micro_batch_tokens": 2048, "gradient_checkpointing": "on"}),
        "ours-mb1-nockpt": (fixed, {**LOWMEM, "micro_batch_tokens": 2048, "gradient_checkpointing": "off"}),
        "ours-realistic-packed": (tokenized, FAST),
        "ours-realistic-unpacked": (tokenized, UNPACKED),
        "ours-fast16-all": (fixed, {**FAST16, "lora": LORA_ALL}),
        "ours-lowmem-all": (fixed, {**LOWMEM, "lora": LORA_ALL}),
        # What the fused LoRA is worth, and the GPU check that the fast paths train the same
        # model: no Liger and peft's own LoRA forward (8,192 tokens: 16,384 unfused does not fit).
        "ours-fast16-peft": (fixed, {**FAST16, "fused_lora": False}),
        "ours-fast-unfused": (fixed, {**FAST, "kernels": "none", "fused_lora": False}),
        "ours-realistic-unpacked-peft": (tokenized, {**UNPACKED, "fused_lora": False}),
    }
    def run_ours(name: str, data: Path, overrides: dict, cap_gib: float | None = None) -> dict:
        run_params = write_params(work / f"params-{name}.yaml", {**common, "train": {**common["train"], **overrides}})
        metrics, timings = work / f"train-{name}.json", work / f"timings-{name}.json"
        try:
            stage("train", run_params, work, "--base", str(base), "--data", str(data), "--out",
                  str(work / f"adapter-{name}"), "--checkpoints", str(work / f"ckpt-{name}"), "--metrics",
                  str(metrics), "--timings", str(timings), log=log, cap_gib=cap_gib)
        except SystemExit as exc:
            return {"failed": str(exc)}
        t = json.loads(timings.read_text())
        m = json.loads(metrics.read_text())
        return {
            "tool": "ours", "settings": overrides, "tokens_per_s": t["steady_input_tokens_per_s"],
            "trained_tokens_per_s": t["steady_trained_tokens_per_s"], "step_s": t["step_time_s"],
            "peak_allocated_gib": t.get("peak_step_memory_gib") or t["peak_memory_gib"],
            "peak_allocated_with_saves_gib": t["peak_memory_gib"], "peak_reserved_gib": t["peak_reserved_gib"],
            # Loading, steps, final evaluation and saving: what the card must hold for the whole stage.
            "stage_peak_allocated_gib": t.get("stage_peak_memory_gib"),
            "stage_peak_reserved_gib": t.get("stage_peak_reserved_gib"),
            "micro_batch": (overrides["micro_batch_tokens"] // 2048 if overrides["packing"]
                            else overrides.get("micro_batch_size")),
            "checkpointing": overrides["gradient_checkpointing"], "trainable_params": m["trainable_params"],
            "first_losses": m["first_train_loss"], "final_loss": m["final_train_loss"],
            "loss_by_step": t.get("train_loss_by_step")}

    def run_peer(name: str, peer_args: list[str], cap_gib: float | None = None) -> dict:
        res = work / f"peer-{name}.json"
        res.unlink(missing_ok=True)
        cap = [str(REPO / "bench" / "memory_cap.py"), str(cap_gib)] if cap_gib else []
        cmd = [sys.executable, *cap, str(REPO / "bench" / "peers.py"), "--model", str(model_dir), "--steps",
               str(args.steps), "--out", str(res), *peer_args]
        with log.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=peer_env(name), cwd=REPO)
        return json.loads(res.read_text()) if res.is_file() else {"failed": f"exit {code}"}

    for name, (data, overrides) in ours.items():
        if (only and name not in only) or (not only and name in OPTIONAL):
            continue
        results["runs"][name] = run_ours(name, data, overrides)
        save()

    for name, peer_args in PEERS.items():
        if (only and name not in only) or (not only and name in OPTIONAL):
            continue
        results["runs"][name] = run_peer(name, peer_args)
        save()

    # Simulated cards: the low-memory settings and Unsloth's checkpointed mode under one cap each.
    sim = results.setdefault("sim_card_results", [])
    for cap_gib in (float(c) for c in filter(None, args.caps.split(","))):
        for tokens in (int(t) for t in args.cap_tokens.split(",")):
            rows, lora = tokens // 2048, args.cap_lora
            suffix = "-all" if lora == "all" else ""
            for tool in ("ours", "unsloth"):
                if tool == "ours":
                    r = run_ours(f"ours-cap{cap_gib:g}-{tokens}{suffix}", fixed,
                                 {**LOWMEM, "micro_batch_tokens": tokens, **({"lora": LORA_ALL} if suffix else {})},
                                 cap_gib)
                else:
                    r = run_peer(f"unsloth-cap{cap_gib:g}-{tokens}{suffix}",
                                 ["--tool", "unsloth", "--micro-batch", str(rows), "--accum", "1", "--checkpointing",
                                  "unsloth", *(["--lora", "all"] if suffix else [])], cap_gib)
                key = (cap_gib, tokens, tool, lora)
                sim[:] = [s for s in sim
                          if (s["cap_gib"], s["tokens_per_step"], s["tool"], s.get("lora", "qkv")) != key]
                sim.append({"cap_gib": cap_gib, "tokens_per_step": tokens, "tool": tool, "lora": lora,
                            "trained": "tokens_per_s" in r, "tokens_per_s": r.get("tokens_per_s"),
                            "step_peak_allocated_gib": r.get("peak_allocated_gib"),
                            "stage_peak_allocated_gib": r.get("stage_peak_allocated_gib",
                                                              r.get("whole_peak_allocated_gib")),
                            **({"failed": r.get("failed") or r.get("skipped")} if "tokens_per_s" not in r else {})})
                save()

    for name, checkpointing in (("ours-profile", "off"), ("ours-profile-lowmem", "offload")):
        if name not in only:
            continue
        res, table = work / f"{name}.json", out / f"{stem}-{name}.txt"
        subprocess.call([sys.executable, str(REPO / "bench" / "peers.py"), "--tool", "ours", "--model",
                         str(model_dir), "--micro-batch", "8", "--accum", "1", "--checkpointing", checkpointing,
                         "--steps", "4", "--autocast", "--out", str(res), "--profile", str(table)], cwd=REPO)
        if res.is_file():
            results["runs"][name] = json.loads(res.read_text())
        save()

    print(f"\n{card}  torch {results['torch']}  transformers {results['transformers']}")
    print(f"{'run':26} {'mb':>3} {'ckpt':>8} {'tokens/s':>9} {'step s':>7} {'peak GiB':>9}")
    for name, r in results["runs"].items():
        if "tokens_per_s" in r:
            print(f"{name:26} {r.get('micro_batch', '')!s:>3} {r.get('checkpointing', '')!s:>8} "
                  f"{r['tokens_per_s']:9.0f} {r['step_s']:7.3f} {r['peak_allocated_gib']:9.2f}")
        else:
            print(f"{name:26} {r.get('skipped') or r.get('failed')}")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


def summarise(results: dict) -> None:
    """The headline keys: this project's configurations against Unsloth's best and checkpointed runs."""
    runs = results["runs"]

    def value(name: str, key: str = "tokens_per_s"):
        return runs.get(name, {}).get(key)

    unsloth = [r["tokens_per_s"] for n, r in runs.items() if n.startswith("unsloth") and "tokens_per_s" in r
               and r.get("micro_batch", 0) > 1]
    results.update({
        "unsloth_best_tokens_per_s": max(unsloth) if unsloth else None,
        "unsloth_checkpointed_tokens_per_s": value("unsloth-ckpt-mb8"),
        "unsloth_checkpointed_peak_gib": value("unsloth-ckpt-mb8", "peak_allocated_gib"),
        "unsloth_mb1_peak_gib": value("unsloth-ckpt-mb1", "peak_allocated_gib"),
        "hf_recipe_tokens_per_s": value("hf-mb8"),
        "ours_fast_tokens_per_s": max(filter(None, [value("ours-fast"), value("ours-fast16")]), default=None),
        "ours_lowmem_tokens_per_s": value("ours-lowmem"),
        "ours_lowmem_peak_gib": value("ours-lowmem", "peak_allocated_gib"),
        "ours_mb1_peak_gib": value("ours-mb1", "peak_allocated_gib"),
        "ours_packed_realistic_tokens_per_s": value("ours-realistic-packed"),
        "ours_unpacked_realistic_tokens_per_s": value("ours-realistic-unpacked"),
        "ours_fixed_tokens_per_s": value("ours-fast"),
        "ours_mb1_tokens_per_s": value("ours-mb1"),
        "unsloth_mb1_tokens_per_s": value("unsloth-ckpt-mb1"),
        "ours_lowmem_stage_peak_gib": value("ours-lowmem", "stage_peak_allocated_gib"),
        "unsloth_checkpointed_whole_peak_gib": value("unsloth-ckpt-mb8", "whole_peak_allocated_gib"),
    })

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    results["ratio_fast"] = ratio(results["ours_fast_tokens_per_s"], results["unsloth_best_tokens_per_s"])
    results["ratio_lowmem"] = ratio(results["ours_lowmem_tokens_per_s"], results["unsloth_checkpointed_tokens_per_s"])
    results["ratio_mb1"] = ratio(results["ours_mb1_tokens_per_s"], results["unsloth_mb1_tokens_per_s"])
    results["ratio_all_linear_fast"] = ratio(value("ours-fast16-all"), value("unsloth-nockpt-mb8-all"))
    results["ratio_all_linear_lowmem"] = ratio(value("ours-lowmem-all"), value("unsloth-ckpt-mb8-all"))
    results["ours_fp8_tokens_per_s"] = value("ours-fast16-fp8")
    results["ratio_fp8_fast"] = ratio(value("ours-fast16-fp8"), results["unsloth_best_tokens_per_s"])
    results["fp8_over_dense"] = ratio(value("ours-fast16-fp8"), value("ours-fast16"))
    dense, fp8 = value("ours-curve-dense", "loss_by_step"), value("ours-curve-fp8", "loss_by_step")
    if dense and fp8:
        gaps = {step: round(fp8[step] / loss - 1, 6) for step, loss in dense.items() if step in fp8}
        worst = max(map(abs, gaps.values()), default=None)
        results["fp8_loss"] = {"steps_compared": len(gaps), "max_relative_gap": worst,
                               "within_1_percent": worst is not None and worst <= 0.01, "gap_by_step": gaps}
    results["realistic_packed_share_of_fixed"] = ratio(results["ours_packed_realistic_tokens_per_s"],
                                                       results["ours_fixed_tokens_per_s"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
