"""Causal attention of packed rows on one CUDA card: which kernel is fastest, and do they agree.

    python bench/attention_backends.py --out result.json

LLaMA-7B's attention shape (32 heads of 128, bf16), 16,384 tokens a micro-batch,
forward + backward. Packed rows: 8 rows of 2,048 tokens, and a mix of lengths
like the realistic rows (100 to 1,100 tokens). Kernels: PyTorch's varlen flash
attention, cuDNN's attention on the same ragged rows (PyTorch's op with row
offsets), the train stage's packed-row attention (which picks between them),
and, for equal rows only, SDPA's flash, cuDNN and memory-efficient backends on
a (8, 32, 2048, 128) batch. Each is compared with the varlen flash kernel. Also the host link:
pinned copies of one layer input (16,384 x 4,096 bf16) each way, for
gradient_checkpointing: offload.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HEADS, DIM, TOKENS = 32, 128, 16384


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() after 3 warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 3)


def lengths_mix(seed: int = 0) -> list[int]:
    import random

    rng, lengths = random.Random(seed), []
    while sum(lengths) < TOKENS:
        lengths.append(min(rng.randint(100, 1100), TOKENS - sum(lengths)))
    return lengths


def packed(lengths: list[int]):
    import torch

    from sabia_ift.train import attention

    q, k, v = (torch.randn(1, HEADS, sum(lengths), DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    attention._CAUSAL.update(attention._causal_kwargs())
    grad = torch.randn(1, sum(lengths), HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    return q, k, v, kw, grad


def flash_varlen(module, query, key, value, mask, scaling=None, **kw):
    from torch.nn.attention.varlen import varlen_attn

    from sabia_ift.train import attention

    q, k, v, cu_q, cu_k, max_q, max_k = attention._packed_rows(query, key, value, kw)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **attention._CAUSAL).unsqueeze(0), None


def cudnn_ragged(module, query, key, value, mask, scaling=None, **kw):
    import torch

    from sabia_ift.train import attention

    q, k, v, cu_q, cu_k, max_q, max_k = attention._packed_rows(query, key, value, kw)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, True, False,
                                                  scale=scaling)[0]
    return out.unsqueeze(0), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sabia_ift.train import attention

    result: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version(), "ms_forward_backward": {}, "agreement": {}}
    scale = DIM ** -0.5
    for shape, lengths in (("8x2048", [2048] * 8), ("mixed", lengths_mix())):
        q, k, v, kw, grad = packed(lengths)
        outs = {}
        for name, fn in (("flash-varlen", flash_varlen), ("cudnn-ragged", cudnn_ragged),
                         ("train-stage", attention._varlen_attention)):
            def step(fn=fn, q=q, k=k, v=v, kw=kw, grad=grad):
                out, _ = fn(None, q, k, v, None, scaling=scale, **kw)
                out.backward(grad)
                return out
            try:
                for t in (q, k, v):
                    t.grad = None
                out = step()
                outs[name] = [out.detach().float(), *(t.grad.float().clone() for t in (q, k, v))]
                result["ms_forward_backward"][f"{shape}/{name}"] = timed(step)
            except Exception as exc:  # a backend this build lacks: recorded, not fatal
                result["ms_forward_backward"][f"{shape}/{name}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        ref = outs.get("flash-varlen")
        for name, got in outs.items():
            if ref is not None and name != "flash-varlen":  # largest error relative to the largest value
                result["agreement"][f"{shape}/{name}"] = {
                    n: round(float((g - r).abs().max() / r.abs().max()), 5)
                    for n, r, g in zip(("out", "dq", "dk", "dv"), ref, got, strict=True)}
    b = torch.randn(8, HEADS, 2048, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(b)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(b, b, b, is_causal=True).backward(g)
        try:
            result["ms_forward_backward"][f"8x2048/sdpa-{name}"] = timed(sdpa)
        except Exception as exc:
            result["ms_forward_backward"][f"8x2048/sdpa-{name}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    layer = torch.randn(TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    host = torch.empty(layer.shape, dtype=layer.dtype, pin_memory=True)
    gib = layer.numel() * 2 / 2**30
    result["host_link_gib_per_s"] = {
        "to_cpu": round(gib / timed(lambda: host.copy_(layer, non_blocking=True)) * 1e3, 1),
        "to_gpu": round(gib / timed(lambda: layer.copy_(host, non_blocking=True)) * 1e3, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
