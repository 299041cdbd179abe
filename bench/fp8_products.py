"""One frozen projection's two products at LLaMA-7B shapes, bf16 against `train.base_matmul: fp8`.

    python bench/fp8_products.py --out DIR [--tokens 16384] [--repeats 20]

For each projection shape of a LLaMA-7B layer (4,096 -> 4,096, 4,096 -> 11,008,
11,008 -> 4,096) and a micro-batch of --tokens rows, times with CUDA events:
the forward product x W^T and the backward's dY W, in bf16 (`torch.mm`) and
through `fp8.Fp8Products` (the activations or gradients quantised per row, the
kept FP8 weight, `torch._scaled_mm`), plus the per-row quantisation alone;
and each FP8 product's relative error against the bf16 one on the same random
operands. The quantisation is timed again compiled by torch.compile (one fused
pass), with how far its result is from the eager one. The step-level speed is
the side-by-side's `ours-fast16-fp8` row; this says what each product gains
and what the quantisation costs.
Writes <out>/<card>-<date>-fp8-products.json and prints it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from attention_backends import timed  # noqa: E402  (median ms of CUDA events)

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in, out): q/k/v/o, gate/up, down


@functools.cache
def _compiled_quantise():
    """quantise_rows compiled once for every shape (each shape compiles on its first call)."""
    import torch

    from sabia_ift.train.fp8 import quantise_rows

    return torch.compile(quantise_rows, dynamic=False)


def measure(products, fan_in: int, fan_out: int, tokens: int, repeats: int, device: str = "cuda") -> dict:
    """One projection shape's row of the results."""
    import torch

    from sabia_ift.train.fp8 import quantise_rows

    dtype = torch.bfloat16
    base = torch.nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
    g = torch.randn(tokens, fan_out, device=device, dtype=dtype)
    w = base.weight
    prepared = products.prepare(x)
    products.weight(base)  # the FP8 copy is built once, at the first product, as in training

    compiled = _compiled_quantise()
    q, scale = quantise_rows(x)
    cq, cscale = compiled(x)

    def error(got, want) -> float:
        return float((got.float() - want.float()).norm() / want.float().norm())

    row = {"in": fan_in, "out": fan_out, "tokens": tokens,
           "forward_bf16_ms": timed(lambda: torch.mm(x, w.t()), repeats),
           "forward_fp8_ms": timed(lambda: products.product(products.prepare(x), base, dtype), repeats),
           "forward_fp8_product_only_ms": timed(lambda: products.product(prepared, base, dtype), repeats),
           "backward_bf16_ms": timed(lambda: torch.mm(g, w), repeats),
           "backward_fp8_ms": timed(lambda: products.input_grad(g, base, dtype), repeats),
           "quantise_rows_ms": timed(lambda: quantise_rows(x), repeats),
           # The same function fused by torch.compile into one pass over each row: what a
           # quantisation at the card's bandwidth would cost (none is used in training yet).
           "quantise_rows_compiled_ms": timed(lambda: compiled(x), repeats),
           "forward_rel_error": error(products.product(prepared, base, dtype), torch.mm(x, w.t())),
           "backward_rel_error": error(products.input_grad(g, base, dtype), torch.mm(g, w)),
           # Inductor keeps the row scale in fp32 where the eager code rounds it to bf16 first,
           # so the bits may differ; how far apart the two dequantised tensors are:
           "quantise_compiled_rel_diff": error(cq.float() * cscale, q.float() * scale)}
    flops = 2 * tokens * fan_in * fan_out
    for key in ("forward_bf16", "forward_fp8", "backward_bf16", "backward_fp8"):
        row[f"{key}_tflops"] = round(flops / (row[f"{key}_ms"] / 1000) / 1e12, 1)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch

    from sabia_ift.train.fp8 import Fp8Products

    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_products.py times FP8 tensor-core products: it needs a CUDA card")
    card = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    products = Fp8Products()
    rows = [measure(products, fan_in, fan_out, args.tokens, args.repeats) for fan_in, fan_out in SHAPES]
    total = {k: round(sum(r[f"{k}_ms"] for r in rows), 3)
             for k in ("forward_bf16", "forward_fp8", "backward_bf16", "backward_fp8")}
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tokens": args.tokens,
              "shapes": rows, "sum_of_shapes_ms": total,
              "fp8_over_bf16": round((total["forward_bf16"] + total["backward_bf16"])
                                     / (total["forward_fp8"] + total["backward_fp8"]), 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-fp8-products.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
