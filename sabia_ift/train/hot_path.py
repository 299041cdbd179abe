"""The train stage's interceptions of transformers and peft, in the one order they work in.

Eight things change how a LLaMA layer runs; each lives in its own module:
  1. kernels.apply_liger      - swaps LLaMA's RMSNorm, RoPE, SwiGLU and loss classes
  2. attention (varlen/sdpa)  - an attention function registered with transformers
  3. offload.ActivationOffload - saved-tensor hooks around the decoder stack
  4. fused_lora.fuse_lora     - peft LoRA layers' forwards, siblings projected together, their
                                frozen products from weights.DenseProducts or fp8.Fp8Products;
                                a SwiGLU MLP's forward where its down projection has LoRA
  4b. fp8.route_frozen        - (base_matmul: fp8) the frozen projections without LoRA in FP8
  5. recompute.split_checkpointing - decoder layers in two checkpointed halves, frozen
     output projections (and the SwiGLU feeding one) deferred, 4-bit heads kept dequantised
  6. attention.SavedAttention - the halves' attention output reused in the recompute
  7. weighting.RowWeighting   - per-row loss weights (attached by the Trainer, training.py)

Why this order:
  - Liger (1) and the attention function (2) must be in place before the model is built:
    Liger replaces classes, and the model picks its attention function when loaded.
  - The offload (3) hooks the decoder stack before LoRA wraps the model, and must exist
    before the split (5), which hands it to each SavedAttention (6).
  - LoRA is attached between (3) and (4): fused LoRA replaces peft's layers' forwards.
  - (4b) comes after LoRA is attached: it tells frozen projections by `requires_grad`, and
    replaces the forward of a LoRA layer's base too, which peft's unfused forward calls. It
    shares (4)'s Fp8Products, so each weight has one FP8 copy. It never meets (5): the
    config refuses fp8 with offload.
  - (4) and (5) both may replace an MLP's forward, never the same one: (4) where down_proj
    has LoRA, (5) where down_proj is frozen.
  - The split (5) comes last: it tells the frozen projections from the LoRA-tuned ones by
    `requires_grad`, which only holds once LoRA is attached, and it wraps the base layers
    under the (fused) LoRA layers, so a recompute runs fused LoRA plus deferred frozen parts.
"""

from __future__ import annotations

import logging

from . import fp8, fused_lora, kernels, recompute
from .offload import ActivationOffload
from .weights import DENSE

log = logging.getLogger(__name__)


def before_load(cfg, device: str) -> None:
    """(1): before the model is built. (2) is chosen by attention.attention_implementation
    and handed to the loader as attn_implementation."""
    if cfg.base_matmul == "fp8":
        fp8.check_device(device)
        # Measured at 7B on an H100 (BENCHMARKS.md): the user should not mistake it for a free speed-up.
        log.warning("train.base_matmul: fp8 is experimental: at 7B it measured 1.07 times the dense step's "
                    "speed and a loss 7.6%% above the dense run's after 200 steps (BENCHMARKS.md)")
    if cfg.kernels == "liger":
        kernels.apply_liger(device)


def before_lora(model, cfg) -> ActivationOffload | None:
    """(3) and the checkpointing mode; returns the offload that after_lora needs."""
    if cfg.gradient_checkpointing == "on":
        # Non-reentrant recompute saves nothing but what it needs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return None
    if cfg.gradient_checkpointing != "offload":
        return None
    # Reentrant halves (recompute.split_checkpointing, once LoRA is attached), whose
    # only saved tensors are their inputs, plus the attention output and log-sum-exp
    # that the recompute reuses: ActivationOffload moves exactly those.
    model.enable_input_require_grads()  # reentrant recompute needs inputs that require grad
    offload = ActivationOffload()
    offload.attach(model.model)
    return offload


def after_lora(model, cfg, offload: ActivationOffload | None) -> None:
    """(4) and (4b), then (5) and (6)."""
    products = fp8.Fp8Products() if cfg.base_matmul == "fp8" else DENSE
    if cfg.fused_lora:
        fused_lora.fuse_lora(model, products)
    if isinstance(products, fp8.Fp8Products):
        fp8.route_frozen(model, products)
    if cfg.gradient_checkpointing == "offload":
        recompute.split_checkpointing(model, offload)
