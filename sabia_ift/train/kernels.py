"""Liger Kernel's fused LLaMA kernels for the train stage.

Everything here comes from a maintained library; this module only checks it can
run and plugs it into transformers.
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
