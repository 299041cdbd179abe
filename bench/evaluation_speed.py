"""The evaluate stage's generation engines on one CUDA card, same model, same prompts.

    python bench/evaluation_speed.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer \
        --work /tmp/bench --out bench/results [--prompts 64] [--max-new-tokens 128]

A LLaMA-7B-architecture model with random weights (bench/gpu_qlora.py builds it),
loaded as the evaluate stage loads it (NF4, double quantization, bf16), with a
LoRA adapter of r=32 on q/k/v whose B is not zero, so merging it changes the
weights. Random weights never emit EOS: every prompt runs to --max-new-tokens,
the base model's case at 7B, which never stops. Prompts are the project's
template over real Portuguese rows.

  4bit   sabia_ift.evaluation.generation.generate: HF generate on the 4-bit model
  fast   fast_generate: a bf16 copy (adapter merged for "tuned"), a fixed KV cache and one CUDA
         graph replay a decoding step (sabia_ift/evaluation/decoding.py); its first call
         captures the graphs, and that time is in the rate
  fast_rows   fast without Liger's norm and rotary kernels (transformers' own)
  fast_mask   fast_rows with its decoding steps reading the batch's longest row through an
         attention mask (the engine before row reads and fused kernels)
  plain  HF generate (eager) on the same bf16 copy: what `fast` must answer, and its speed
  fast_continuous   transformers' continuous batching on the same copy (only when named in --plan)

Each at batch 1, 16 and 64, base (adapter off) and tuned (adapter on), as
gen_tokens_per_s; limit_tokens_per_s_batch64 is what the card's memory bandwidth
allows when each decoding step reads the bf16 weights and the batch's KV cache once.
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

# Peak memory bandwidth, bytes/s, from the cards' data sheets.
BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H200": 4.8e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tag", default="evaluation", help="suffix of the results file name")
    p.add_argument("--plan", default="4bit:1,16,64;fast:1,16,64",
                   help="engine:batch sizes, ';' between engines")
    args = p.parse_args()

    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from sabia_ift.evaluation.generation import copy_bytes, fast_generate, generate, inference_copy
    from sabia_ift.modeling import load_model, load_tokenizer
    from sabia_ift.template import build_prompt, encode_prompt

    model_dir = args.work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, quantization="nf4", double_quant=True, dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj"])).eval()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()[: args.prompts]]
    prompts = [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    card = torch.cuda.get_device_name(0)
    new = args.max_new_tokens
    mean_prompt = sum(map(len, prompts)) / len(prompts)
    config = base.config
    weights = copy_bytes(model)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in card), None)
    result: dict = {"card": card, "torch": torch.__version__, "max_new_tokens": new,
                    "mean_prompt_tokens": round(mean_prompt, 1), "bf16_weight_bytes": weights,
                    "kv_bytes_per_token": kv_token, "bandwidth_bytes_per_s": bandwidth,
                    "gen_tokens_per_s": {}, "seconds": {}}
    if bandwidth:
        # One decoding step reads every weight once and each row's cache so far (on average the
        # prompt and half the answer): 64 tokens a step.
        step = (weights + 64 * kv_token * (mean_prompt + new / 2)) / bandwidth
        result["limit_tokens_per_s_batch64"] = round(64 / step)

    def continuous(plain, batch, few, tokens):
        gc = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        out = plain.generate_batch(few, generation_config=gc,
                                   continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch))
        return [type("G", (), {"new_tokens": len(r.generated_tokens)}) for r in out.values()]

    def run(engine, plain, batch, few, tokens=new):
        if engine == "4bit":
            return generate(model, tokenizer, few, max_new_tokens=tokens, batch_size=batch, device="cuda")
        if engine == "plain":
            return generate(plain, tokenizer, few, max_new_tokens=tokens, batch_size=batch, device="cuda")
        if engine == "fast_continuous":
            return continuous(plain, batch, few, tokens)
        return fast_generate(model, tokenizer, few, max_new_tokens=tokens, batch_size=batch, plain=plain,
                             attention="mask" if engine == "fast_mask" else "auto",
                             fused=False if engine in ("fast_mask", "fast_rows") else None)

    def save(result: dict) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-{args.tag}.json"
        path.write_text(json.dumps(result, indent=2))

    answers: dict = {}
    plan = {engine: [int(b) for b in batches.split(",")]
            for engine, batches in (part.split(":") for part in args.plan.split(";"))}
    for tuned in (False, True):
        which = "tuned" if tuned else "base"
        plain = None
        for engine, batches in plan.items():
            if engine != "4bit" and plain is None:
                torch.cuda.synchronize()
                start = time.perf_counter()
                with model.disable_adapter() if not tuned else contextlib.nullcontext():
                    plain = inference_copy(model, merge=tuned)
                torch.cuda.synchronize()
                result["seconds"]["copy"] = round(time.perf_counter() - start, 2)
            with model.disable_adapter() if not tuned else contextlib.nullcontext(), torch.inference_mode():
                for batch in batches:
                    # batch 1 answers two prompts: its rate is per row and rows are alike.
                    few = prompts[: min(len(prompts), max(batch, 2))]
                    result.setdefault("free_gib_before", {})[f"{engine}_{which}_b{batch}"] = round(
                        torch.cuda.mem_get_info()[0] / 2**30, 1)
                    start = time.perf_counter()
                    try:
                        run(engine, plain, batch, few[:1], tokens=4)  # warm-up
                        torch.cuda.synchronize()
                        result["seconds"][f"{engine}_{which}_b{batch}_first"] = round(time.perf_counter() - start, 2)
                        start = time.perf_counter()
                        gens = run(engine, plain, batch, few)
                        torch.cuda.synchronize()
                    except Exception as exc:  # one engine failing must not lose the others' numbers
                        result.setdefault("errors", {})[f"{engine}_{which}_b{batch}"] = repr(exc)[:500]
                        print(engine, which, batch, "failed:", repr(exc)[:500], flush=True)
                        continue
                    seconds = time.perf_counter() - start
                    rate = round(sum(g.new_tokens for g in gens) / seconds, 1)
                    result["gen_tokens_per_s"].setdefault(engine, {}).setdefault(which, {})[f"batch{batch}"] = rate
                    print(engine, which, batch, rate, flush=True)
                    save(result)
                    if batch == 64 and engine in ("4bit", "fast", "fast_rows", "fast_mask", "plain"):
                        answers[(engine, which)] = [g.token_ids for g in gens]
        del plain
        torch.cuda.empty_cache()
    # Greedy answers of batch 64 that are the same string: the fast engine against HF generate on the
    # same bf16 weights, and against the 4-bit model (the same numbers through other kernels).
    for other in ("plain", "4bit", "fast_mask", "fast_rows"):
        for which in ("base", "tuned"):
            a, b = answers.get((other, which)), answers.get(("fast", which))
            if a and b:
                result.setdefault(f"same_answer_share_vs_{other}", {})[f"fast_{which}"] = round(
                    sum(x == y for x, y in zip(a, b)) / len(a), 3)
                # Random weights give near-tied logits, where bf16 kernels of other shapes part ways.
                agree = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
                         for x, y in zip(a, b)]
                result.setdefault(f"mean_agreeing_prefix_tokens_vs_{other}", {})[f"fast_{which}"] = round(
                    sum(agree) / len(agree), 1)
                result.setdefault(f"same_first_token_share_vs_{other}", {})[f"fast_{which}"] = round(
                    sum(n > 0 for n in agree) / len(agree), 3)
    save(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
