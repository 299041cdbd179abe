"""Liger Kernel's fused LLaMA kernels for the train stage, and the SwiGLU activation as the
fused LoRA and the recompute compute it outside its module.

Everything here comes from a maintained library; this module only checks it can
run, plugs it into transformers, and calls the same SwiGLU kernels the model's MLP uses.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError

log = logging.getLogger(__name__)


def check_liger(device: str) -> None:
    """Liger Kernel can run here: a CUDA device and the package."""
    if device != "cuda":
        raise ConfigError("train.kernels: liger needs a CUDA GPU (its kernels are Triton); set it to none on CPU")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"train.kernels: liger needs the liger-kernel package ({exc}); "
                          "pip install liger-kernel, or set train.kernels: none") from None


def apply_liger(device: str) -> None:
    """Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy for LLaMA models.

    Must run before the model is built: it swaps the modules' classes in
    transformers' LLaMA code. The fused cross-entropy never materialises the
    32k-vocabulary logits of a whole micro-batch.
    """
    check_liger(device)
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    log.info("Liger Kernel: fused RMSNorm, RoPE, SwiGLU and linear cross-entropy")


def swiglu_kind(mlp) -> str | None:
    """'liger' or 'torch' for an MLP computing down(silu(gate(x)) * up(x)); None for any other."""
    kind = type(mlp).__name__
    silu = getattr(getattr(mlp, "config", None), "hidden_act", None) in ("silu", "swish")
    if kind == "LigerSwiGLUMLP" and type(mlp).__module__.startswith("liger_kernel"):
        return "liger"
    if kind == "LlamaMLP" and type(mlp).__module__.startswith("transformers") and silu:
        return "torch"
    return None


def swiglu(a, b, liger: bool):
    """silu(a) * b, by the kernel the MLP itself runs (Liger's, or torch's two ops)."""
    import torch

    if liger:
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(a, b)[2]
    return torch.nn.functional.silu(a) * b


def swiglu_grads(a, b, dh, liger: bool):
    """(da, db) of h = silu(a) * b from dh. Liger's kernel writes them over a and b, which the
    callers read no more; the torch path runs the ops autograd runs for silu(a) * b."""
    import torch

    if liger:
        from liger_kernel.ops.swiglu import swiglu_backward

        return swiglu_backward(a, b, dh)
    db = dh * torch.nn.functional.silu(a)
    da = torch.ops.aten.silu_backward(dh * b, a)
    return da, db
