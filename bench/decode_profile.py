"""Where a decoding step's time goes: the evaluate stage's decoder at batch 64 on one CUDA card.

    python bench/decode_profile.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer --work /tmp/bench \
        --out bench/results [--prompts 64] [--steps 8]

The random LLaMA-7B (bench/gpu_qlora.py builds it) in bf16, 64 prompts of the
realistic rows, sabia_ift.evaluation.decoding.GreedyDecoder as the fast engine
runs it, once for each of --variants (the batch's longest row read through a mask;
each row's own length; that and Liger's norm and rotary kernels). After the
prefill and a few steps, times (CUDA events) the step as a captured graph
replays it and as it runs eagerly, at the cache length the step reads, then
profiles the eager steps (torch.profiler, the card's kernels by
time) and sums them by kind: matrix products, attention, everything else. Beside
them, what the step must read: the weights and the cache up to that length, and
at the card's bandwidth the time that takes.

Writes <out>/<card>-<date>-decode-profile.json and ...-decode-profile.txt (the kernel table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from evaluation_speed import BANDWIDTH  # noqa: E402
from gpu_qlora import build_model  # noqa: E402

# Kernel names by kind; the rest counts as "other" (norms, rotary, elementwise, copies, argmax).
# Attention first: its kernels' names may name cutlass too.
KINDS = {"attention": ("fmha", "attention", "flash", "cudnn", "softmax"),
         "matmul": ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")}


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, words in KINDS.items() if any(w in low for w in words)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="steps timed and profiled each way")
    p.add_argument("--variants", default="mask,rows,rows-fused",
                   help="decoders to time, ',' between them: mask (the batch's longest row read through a mask), "
                        "rows (each row's own length), rows-fused (and Liger's norm and rotary kernels)")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from sabia_ift.evaluation.decoding import GreedyDecoder, round_slots
    from sabia_ift.modeling import load_tokenizer
    from sabia_ift.template import build_prompt, encode_prompt

    model_dir = args.work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda").eval()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()[: args.prompts]]
    prompts = [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    # Steps run: 8 in decode, then 1 + steps graphed, 1 + steps eager and steps profiled.
    width, new = max(map(len, prompts)), 8 + 3 * args.steps + 4
    card = torch.cuda.get_device_name(0)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    config = model.config
    kv_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size
                                                                          // config.num_attention_heads) * 2
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in card), None)
    result = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": len(prompts),
              "widest_prompt": width, "mean_prompt": round(sum(map(len, prompts)) / len(prompts), 1),
              "bandwidth_bytes_per_s": bandwidth,
              "weights_ms": round(weights / bandwidth * 1000, 3) if bandwidth else None}
    def timed(fn, steps: int, length: int) -> float:
        """Milliseconds a step, CUDA events around `steps` calls of fn(length)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn(length)  # a graph's capture, or the eager kernels' first launch, outside the time
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            fn(length)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps

    def read_length(decoder, steps: int) -> int:
        # What the next 1 + `steps` steps read: the whole store with row reads (each row stops at
        # its own length), else the longest row after them, rounded up as the decoder rounds it.
        return decoder.slots if decoder.attention == "rows" else round_slots(int(decoder.row_slots.max()) + 1 + steps)

    tables = []
    for variant in args.variants.split(","):
        attention = variant.split("-")[0]
        decoder = GreedyDecoder(model, rows=len(prompts), slots=width + new + 256, max_new_tokens=new,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=None, attention=attention,
                                fused=variant.endswith("-fused"))

        with torch.inference_mode():
            decoder.decode(prompts, 8)  # the prefill and the first steps; the cache now holds every prompt
            with decoder.own_kernels():
                graph_ms = timed(decoder._run_step, args.steps, read_length(decoder, args.steps))
                decoder.graphed = False
                eager_ms = timed(decoder._run_step, args.steps, read_length(decoder, args.steps))
                # Slots each row holds after the profiled steps (what row reads read); the mask reads `length`.
                held = (decoder.row_slots + args.steps).float()
                length = read_length(decoder, args.steps)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.steps):
                        decoder._step(length)
                    torch.cuda.synchronize()
        slots_read = float(held.mean()) if attention == "rows" else length
        events = prof.key_averages()
        by_kind: dict[str, float] = {}
        for e in events:
            device_us = getattr(e, "self_device_time_total", None)
            if device_us is None:
                device_us = e.self_cuda_time_total
            if device_us and e.device_type.name == "CUDA":
                by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + device_us / 1000 / args.steps
        read = weights + len(prompts) * kv_token * slots_read
        result[variant] = {
            "cache_slots_read_per_row": round(slots_read, 1), "graph_step_ms": round(graph_ms, 3),
            "eager_step_ms": round(eager_ms, 3), "graph_tokens_per_s": round(len(prompts) / graph_ms * 1000, 1),
            "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items())},
            "kernel_ms": round(sum(by_kind.values()), 3), "bytes_read_per_step": read,
            "bandwidth_ms": round(read / bandwidth * 1000, 3) if bandwidth else None,
        }
        sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        tables.append(f"decoder: {variant}\n" + events.table(sort_by=sort, row_limit=30))
        del decoder
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-decode-profile"
    stem.with_suffix(".txt").write_text("\n\n".join(tables))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
