"""Evaluate-stage generation on one CUDA card: batched vs one prompt at a time.

    python bench/generation_speed.py --model DIR --rows .bench/rows.jsonl --out result.json

Loads the model the way the evaluate stage does (NF4, double quantization,
bf16) and runs sabia_ift.evaluation.generation.generate, greedy, on prompts
built by the project's template from real Portuguese rows. Reports prompts/s
at each batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--single", type=int, default=8, help="prompts timed one at a time")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()

    import torch

    from sabia_ift.evaluation.generation import generate
    from sabia_ift.modeling import load_model, load_tokenizer
    from sabia_ift.template import build_prompt, encode_prompt

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, quantization="nf4", double_quant=True, dtype=torch.bfloat16, device="cuda")
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()[: args.prompts]]
    prompts = [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    result = {"card": torch.cuda.get_device_name(0), "max_new_tokens": args.max_new_tokens,
              "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1)}
    generate(model, tokenizer, prompts[:2], max_new_tokens=8, batch_size=2, device="cuda")  # warm-up
    for batch, subset in ((len(prompts), prompts), (1, prompts[: args.single])):
        torch.cuda.synchronize()
        start = time.perf_counter()
        gens = generate(model, tokenizer, subset, max_new_tokens=args.max_new_tokens, batch_size=batch, device="cuda")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result[f"batch_{batch}"] = {"prompts": len(subset), "seconds": round(seconds, 2),
                                    "prompts_per_s": round(len(subset) / seconds, 3),
                                    "new_tokens": sum(g.new_tokens for g in gens)}
    result["speedup"] = round(result[f"batch_{len(prompts)}"]["prompts_per_s"] / result["batch_1"]["prompts_per_s"], 1)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
