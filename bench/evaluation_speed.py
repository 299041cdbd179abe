"""The evaluate stage's two generation engines on one CUDA card, same model, same prompts.

    python bench/evaluation_speed.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer \
        --work /tmp/bench --out bench/results [--prompts 64] [--many 256] [--max-new-tokens 128]

A LLaMA-7B-architecture model with random weights (bench/gpu_qlora.py builds it),
loaded as the evaluate stage loads it (NF4, double quantization, bf16), with a
LoRA adapter of r=32 on q/k/v whose B is not zero, so merging it changes the
weights. Random weights never emit EOS: every prompt runs to --max-new-tokens,
the base model's case at 7B, which never stops. Prompts are the project's
template over real Portuguese rows.

  hf     sabia_ift.evaluation.generation.generate: HF generate on the 4-bit model, batches of --prompts
  fast   fast_generate: continuous batching on a bf16 copy with the adapter merged
         (the copy's build time is reported apart; the stage pays it once per model)

Reports new tokens/s for each, the fast engine again on --many prompts, and the
share of prompts whose greedy answers agree between the engines.
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
from gpu_qlora import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--many", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from sabia_ift.evaluation.generation import fast_generate, generate, inference_copy, release_copies
    from sabia_ift.modeling import load_model, load_tokenizer
    from sabia_ift.template import build_prompt, encode_prompt

    model_dir = args.work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, quantization="nf4", double_quant=True, dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj"])).eval()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()[: max(args.prompts, args.many)]]
    prompts = [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    card = torch.cuda.get_device_name(0)
    result: dict = {"card": card, "torch": torch.__version__, "max_new_tokens": args.max_new_tokens,
                    "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1)}

    def timed(label: str, fn, count: int):
        torch.cuda.synchronize()
        start = time.perf_counter()
        gens = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(g.new_tokens for g in gens)
        result[label] = {"prompts": count, "seconds": round(seconds, 2), "new_tokens": tokens,
                         "new_tokens_per_s": round(tokens / seconds, 1)}
        print(label, result[label], flush=True)
        return gens

    few = prompts[: args.prompts]
    with torch.inference_mode():
        generate(model, tokenizer, few[:2], max_new_tokens=4, batch_size=2, device="cuda")  # warm-up
        hf = timed("hf", lambda: generate(model, tokenizer, few, max_new_tokens=args.max_new_tokens,
                                          batch_size=len(few), device="cuda"), len(few))
        torch.cuda.synchronize()
        start = time.perf_counter()
        plain = inference_copy(model, merge=True)
        torch.cuda.synchronize()
        result["fast_copy_s"] = round(time.perf_counter() - start, 2)
        fast_generate(model, tokenizer, few[:2], max_new_tokens=4, plain=plain)  # warm-up
        fast = timed("fast", lambda: fast_generate(model, tokenizer, few, max_new_tokens=args.max_new_tokens,
                                                   plain=plain), len(few))
        timed("hf_bf16", lambda: generate(plain, tokenizer, few, max_new_tokens=args.max_new_tokens,
                                          batch_size=len(few), device="cuda"), len(few))
        timed("fast_graphs", lambda: fast_generate(model, tokenizer, few, max_new_tokens=args.max_new_tokens,
                                                   plain=plain, batching={"use_cuda_graph": True}), len(few))
        if args.many:
            timed("fast_many", lambda: fast_generate(model, tokenizer, prompts[: args.many],
                                                     max_new_tokens=args.max_new_tokens, plain=plain), args.many)
    result["speedup"] = round(result["fast"]["new_tokens_per_s"] / result["hf"]["new_tokens_per_s"], 2)
    if args.many:
        result["speedup_many"] = round(result["fast_many"]["new_tokens_per_s"] / result["hf"]["new_tokens_per_s"], 2)
    result["same_answer_share"] = round(sum(a.text == b.text for a, b in zip(hf, fast)) / len(few), 3)
    # Where answers part, how far they agree: the first differing token position, averaged.
    agree = []
    for a, b in zip(hf, fast):
        x, y = (tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in (a, b))
        agree.append(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))))
    result["mean_agreeing_prefix_tokens"] = round(sum(agree) / len(agree), 1)
    release_copies()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-evaluation-speed.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
