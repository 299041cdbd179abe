"""One QLoRA training measurement in a fresh process: the HF+PEFT recipe, Unsloth, or this project's model.

    python bench/peers.py --tool hf|unsloth|ours --model DIR --micro-batch 8 --accum 1 \
        --checkpointing on|off|unsloth|offload --steps 10 --out result.json [--lora qkv|all] [--profile table.txt]

Every tool trains the same thing: NF4 + double quantization, bf16 compute,
SDPA (or the tool's own attention), LoRA r=32, alpha 64, dropout 0 on q/k/v
(--lora all: r=16, alpha 32 on all seven projections, the QLoRA paper's placement),
AdamW at 2e-4, rows of exactly 2,048 real tokens with loss on all but the
first 256, global batch = micro-batch x accumulation. The loop is the same
plain PyTorch loop for all, timed with CUDA synchronisation at each optimizer
step; the first two steps are warm-up and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj"]
LORAS = {"qkv": {"r": 32, "alpha": 64, "target_modules": TARGETS},
         "all": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]}}
SEQ = 2048
PROMPT = 256


def hf_recipe(folder: str, checkpointing: str, lora: dict):
    """The recipe most QLoRA tutorials use: prepare_model_for_kbit_training + get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing == "on",
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                            target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM"))


def unsloth_model(folder: str, checkpointing: str, lora: dict):
    import torch
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=SEQ, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    return FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0, target_modules=lora["target_modules"],
        bias="none",
        use_gradient_checkpointing="unsloth" if checkpointing == "unsloth" else False, random_state=0)


def ours(folder: str, checkpointing: str, kernels: str, micro_batch: int, lora: dict):
    """This project's model exactly as the train stage builds it (sabia_ift.train.training.build_model)."""
    import torch

    sys.path.insert(0, str(REPO))
    from sabia_ift.config import section_from_params
    from sabia_ift.train.attention import attention_implementation
    from sabia_ift.train.training import build_model

    cfg = section_from_params("train", {
        "quantization": "nf4", "gradient_checkpointing": checkpointing, "kernels": kernels, "packing": True,
        "micro_batch_tokens": micro_batch * SEQ, "report_to": [],  # this loop logs nothing
        "lora": {**lora, "dropout": 0.0}}, REPO / "params.yaml")
    attn = attention_implementation("auto", True, "cuda")
    return build_model(cfg, Path(folder), "cuda", torch.bfloat16, attn)


def batches(micro_batch: int, packed: bool, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, vocab, (micro_batch, SEQ), generator=g)
        ids[:, 0] = 1
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        if not packed:
            yield {"input_ids": ids.cuda(), "labels": labels.cuda()}
            continue
        cu = torch.arange(0, (micro_batch + 1) * SEQ, SEQ, dtype=torch.int32)
        yield {"input_ids": ids.reshape(1, -1).cuda(), "labels": labels.reshape(1, -1).cuda(),
               "position_ids": torch.arange(SEQ).repeat(micro_batch).reshape(1, -1).cuda(),
               "cu_seq_lens_q": cu.cuda(), "cu_seq_lens_k": cu.cuda(), "max_length_q": SEQ, "max_length_k": SEQ}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=["hf", "unsloth", "ours"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--checkpointing", default="on")
    p.add_argument("--kernels", default="liger")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--lora", choices=sorted(LORAS), default="qkv", help="where LoRA goes (module docstring)")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around forward, as the HF Trainer does")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of the top CUDA kernels here")
    args = p.parse_args()

    import torch
    from repro_check import cpu_summary  # bench/, this script's folder, is on the path

    result = {"tool": args.tool, "micro_batch": args.micro_batch, "accum": args.accum,
              "checkpointing": args.checkpointing, "lora": args.lora, "host_cpu": cpu_summary()}
    lora = LORAS[args.lora]
    if args.tool == "hf":
        model = hf_recipe(args.model, args.checkpointing, lora)
    elif args.tool == "unsloth":
        try:
            model = unsloth_model(args.model, args.checkpointing, lora)
        except Exception as exc:  # not importable on this machine: say why, measure nothing
            result["skipped"] = f"{type(exc).__name__}: {exc}"[:500]
            Path(args.out).write_text(json.dumps(result, indent=2))
            return
    else:
        model = ours(args.model, args.checkpointing, args.kernels, args.micro_batch, lora)
        result["kernels"] = args.kernels
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    data = batches(args.micro_batch, args.tool == "ours", model.config.vocab_size)

    # Loading and quantising can peak above the loop: the process's whole peak is the larger one.
    load_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def step() -> None:
        for _ in range(args.accum):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.autocast):
                loss = model(**next(data)).loss / args.accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) * args.accum)

    for i in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.accum * SEQ
    trained = args.micro_batch * args.accum * (SEQ - PROMPT)
    result.update({"step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
                   "trained_tokens_per_s": round(trained / step_s, 1),
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                   "whole_peak_allocated_gib": round(max(load_peak, torch.cuda.max_memory_allocated()) / 2**30, 3),
                   "losses": [round(x, 4) for x in losses]})
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages()
        # By total (where a step's time goes, op by op), then by self time (which kernels spend it).
        Path(args.profile).write_text(
            table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70) + "\n"
            + table.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


if __name__ == "__main__":
    main()
