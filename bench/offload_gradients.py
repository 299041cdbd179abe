"""GPU check: `gradient_checkpointing: offload` gives the gradients of no checkpointing.

    python bench/offload_gradients.py --model /tmp/bench/llama-7b-random [--micro-batch 4]

The model the train stage builds (bench/peers.py: NF4, Liger, fused LoRA,
packed rows of 2,048 tokens, bf16 autocast) is built three times from one
folder with the same LoRA weights: checkpointing off, on (transformers'
recompute, the noise floor of recomputing in bf16) and offload. One backward
pass each; prints the loss and, for every LoRA weight, the relative
difference of its gradient from the run without checkpointing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import batches, ours  # noqa: E402


def gradients(folder: str, checkpointing: str, micro_batch: int, lora: dict | None):
    import torch

    model = ours(folder, checkpointing, "liger", micro_batch)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if lora is None:
        # peft starts B at zero, which leaves A without a gradient: give B values.
        g = torch.Generator(device="cuda").manual_seed(1)
        with torch.no_grad():
            for name, p in named.items():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=g)
        lora = {n: p.detach().clone() for n, p in named.items()}
    else:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(lora[name])
    model.train()
    batch = next(batches(micro_batch, True, model.config.vocab_size, seed=3))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in named.items()}
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, named, batch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return float(loss), grads, lora, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()

    loss_ref, ref, lora, peak_ref = gradients(args.model, "off", args.micro_batch, None)
    report = {"off": {"loss": loss_ref, "peak_gib": round(peak_ref, 2)}}
    for mode in ("on", "offload"):
        loss, grads, _, peak = gradients(args.model, mode, args.micro_batch, lora)
        rel = {n: float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref}
        report[mode] = {"loss": loss, "peak_gib": round(peak, 2), "max_rel_grad_diff": max(rel.values()),
                        "mean_rel_grad_diff": sum(rel.values()) / len(rel), "weights": len(rel)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
