"""Does the CPU change the numbers? A tiny LLaMA trained a few steps, its bytes hashed.

Runs the same computation (the tiny default's architecture, AdamW, SDPA, cross-entropy)
in fresh processes under each requested setting and prints one JSON line each:
the sha256 of the trained weights, the last loss and the seconds it took. Compare
the lines of two machines, or of two settings on one machine:

    python bench/cpu_numerics.py                      # pinned (as the stages run) and native
    python bench/cpu_numerics.py --capabilities default avx2 avx512
    python bench/cpu_numerics.py --ops --modes pinned    # each op of a training step alone

A setting is a value of ATEN_CPU_CAPABILITY given to the child process; `pinned`
children import sabia_ift.determinism first, as every stage does, so their capability
comes from the pins whatever the shell says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, os, sys, time
if os.environ["PROBE_MODE"] == "pinned":
    from sabia_ift.determinism import pin_cpu_numerics
    pin_cpu_numerics()
    os.environ.update(json.loads(os.environ.get("PROBE_VARIANT", "{}")))
import torch
from transformers import LlamaConfig, LlamaForCausalLM
start = time.perf_counter()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=False)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(1)
for _ in range(int(os.environ["PROBE_STEPS"])):
    batch = torch.randint(0, 32000, (16, 128), generator=generator)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.numpy().tobytes())
print(json.dumps({"mode": os.environ["PROBE_MODE"], "variant": os.environ.get("PROBE_VARIANT"),
                  "asked": os.environ.get("ATEN_CPU_CAPABILITY"),
                  "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "sha256": digest.hexdigest()[:16], "last_loss": loss.item(),
                  "seconds": round(time.perf_counter() - start, 2)}))
"""

# Each op of a LLaMA training step on inputs made of integers only (no RNG, whose CPU
# kernels could differ too), hashed alone: where two machines differ, the first op that
# does is the culprit.
OPS_CHILD = r"""
import hashlib, json, os
if os.environ["PROBE_MODE"] == "pinned":
    from sabia_ift.determinism import pin_cpu_numerics
    pin_cpu_numerics()
    os.environ.update(json.loads(os.environ.get("PROBE_VARIANT", "{}")))
import torch
import torch.nn.functional as F

def data(*shape, salt=0):
    n = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64) + salt * 7919
    return (((n * 2654435761) % 1000003).float() / 1000003 - 0.5).reshape(shape)

def h(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]

x, w, w2 = data(2048, 128), data(32000, 128, salt=1), data(384, 128, salt=2)
q, k, v = (data(16, 4, 128, 32, salt=s) for s in (3, 4, 5))
logits = data(2048, 32000, salt=6) * 20
labels = (torch.arange(2048) * 7) % 32000
out = {
    "linear_lm_head": h(F.linear(x, w)), "linear_mlp": h(F.linear(x, w2)),
    "linear_small": h(F.linear(x[:16], w2[:128])), "matmul_T": h(x.T @ x),
    "exp": h(torch.exp(logits)), "log": h(torch.log(logits.abs() + 1)), "tanh": h(torch.tanh(logits)),
    "silu": h(F.silu(logits)), "rsqrt_mean": h(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
    "sum": h(logits.sum(-1)), "softmax": h(torch.softmax(logits, -1)), "log_softmax": h(torch.log_softmax(logits, -1)),
    "cross_entropy": h(F.cross_entropy(logits, labels)),
    "sdpa": h(F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "sin_cos": h(torch.cos(logits[:64]) + torch.sin(logits[:64])),
}
emb = torch.nn.Embedding(32000, 128)
with torch.no_grad():
    emb.weight.copy_(w)
emb(labels.reshape(16, 128)).pow(2).sum().backward()
out["embedding_backward"] = h(emb.weight.grad)
a, b = data(384, 128, salt=10), data(384, 128, salt=11).abs() + 0.1
out.update(sqrt=h(torch.sqrt(b)), div=h(a / b), addcdiv=h(a.addcdiv(a, b, value=-0.3)), lerp=h(a.lerp(b, 0.1)),
           addcmul=h(a.addcmul(b, b, value=0.001)), vector_norm=h(torch.linalg.vector_norm(logits)))
for name, kwargs in (("adamw", {}), ("adamw_foreach", {"foreach": True}), ("adamw_fused", {"fused": True})):
    param = torch.nn.Parameter(w2.clone())
    opt = torch.optim.AdamW([param], lr=1e-3, **kwargs)
    for step in range(2):
        param.grad = data(384, 128, salt=9 + step)
        opt.step()
    out[name] = h(param)
for name, fn in (("softmax_backward", lambda t: torch.softmax(t, -1)), ("silu_backward", F.silu),
                 ("ce_backward", lambda t: F.cross_entropy(t, labels))):
    t = logits[:256].clone().requires_grad_()
    fn(t).sum().backward() if name != "ce_backward" else fn(logits.clone().requires_grad_()).backward()
    out[name] = h(t.grad) if t.grad is not None else None
qs = [t.clone().requires_grad_() for t in (q, k, v)]
F.scaled_dot_product_attention(*qs, is_causal=True).pow(2).sum().backward()
out["sdpa_backward"] = h(torch.cat([t.grad for t in qs]))
print(json.dumps({"mode": os.environ["PROBE_MODE"], "variant": os.environ.get("PROBE_VARIANT"),
                  "torch": torch.__version__, **out}))
"""


def search_path(root: str) -> str:
    """PYTHONPATH with this checkout first, keeping what the caller had (carried packages)."""
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2"])
    parser.add_argument("--modes", nargs="+", default=["pinned", "native"], choices=["pinned", "native"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ops", action="store_true", help="hash each op alone instead of a training run")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[;KEY=VALUE]",
                        help="pinned, then these variables changed too (one child per --variant)")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [(mode, {}) for mode in args.modes]
    runs += [("pinned", dict(item.split("=", 1) for item in variant.split(";"))) for variant in args.variant]
    child = OPS_CHILD if args.ops else CHILD
    for mode, variant in runs:
        for capability in args.capabilities:
            env = {**os.environ, "PROBE_MODE": mode, "PROBE_STEPS": str(args.steps),
                   "PROBE_VARIANT": json.dumps(variant),
                   "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": search_path(root)}
            if mode == "native":
                env["SABIA_IFT_CPU_NUMERICS"] = "native"
            done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
            print(done.stdout.strip() or done.stderr[-2000:], flush=True)

if __name__ == "__main__":
    main()
