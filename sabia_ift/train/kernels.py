"""Faster kernels for the train stage: varlen attention for packed rows, Liger Kernel, activation offload.

Everything here comes from maintained libraries (PyTorch's varlen flash
attention, Liger Kernel); this module only plugs them into transformers.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

VARLEN = "sabia_varlen"


def _packed_rows(query, key, value, kwargs):
    """(tokens, heads, dim) views of transformers' (1, heads, tokens, dim) and the row boundaries."""
    import torch

    # squeeze, not [0]: the backward of a select writes a zero tensor and copies into it,
    # a full pass over q, k and v per layer (2.5% of a step at 7B); a squeeze's is a view.
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat K/V heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    cu_q = kwargs["cu_seq_lens_q"].to(device=q.device, dtype=torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q).to(device=q.device, dtype=torch.int32)
    return q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"])


def _equal_rows_attention(module, q, k, v, rows: int, length: int, scaling):
    """Rows of one length are a dense batch: SDPA, preferring cuDNN's attention.

    On an NVIDIA H100 80GB, cuDNN's kernel takes 2.7 ms forward and backward
    for 8 x 2,048 tokens against 5.0 ms for the varlen flash kernel
    (bench/attention_backends.py). Its ragged-row variant gave wrong gradients
    in PyTorch 2.11, so rows of mixed lengths stay on the varlen kernel.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import recompute

    tokens, heads, dim = q.shape
    qb, kb, vb = (t.reshape(rows, length, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = recompute.saved_causal_attention(module, qb, kb, vb, scaling)  # None outside a checkpointed half
    if out is not None:
        return out.transpose(1, 2).reshape(1, tokens, heads, dim)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scaling)
    return out.transpose(1, 2).reshape(1, tokens, heads, dim)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention inside each packed row only, through PyTorch's varlen flash kernel.

    transformers hands over (batch=1, heads, tokens, dim) and the row boundaries
    the flattening collator computed (cu_seq_lens_*). Without them (a padded
    batch, generation) it falls back to SDPA.
    """
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    q, k, v, cu_q, cu_k, max_q, max_k = _packed_rows(query, key, value, kwargs)
    rows = cu_q.numel() - 1
    # Every row is at most max_q long, so they all are exactly that when they fill the batch
    # (known from shapes alone: no GPU synchronisation).
    if max_q * rows == q.shape[0] and max_k == max_q and k.shape[0] == q.shape[0]:
        return _equal_rows_attention(module, q, k, v, rows, max_q, scaling), None
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **_CAUSAL)
    return out.unsqueeze(0), None


def _causal_kwargs() -> dict:
    """torch 2.11 spells causal `is_causal=True`; later versions `window_size=(-1, 0)`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return {}
    params = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


_CAUSAL: dict = {}


def register_varlen_attention() -> str:
    """Register the varlen attention with transformers; returns its attn_implementation name."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        raise ConfigError("train.attention: varlen needs torch.nn.attention.varlen (PyTorch 2.10 or later)") from None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    _CAUSAL.update(_causal_kwargs())
    AttentionInterface.register(VARLEN, _varlen_attention)
    # Like flash attention: no dense mask; row boundaries come as cu_seq_lens.
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return VARLEN


def attention_implementation(requested: str, packing: bool, device: str) -> str:
    """`auto`: varlen flash attention for packed rows on CUDA, SDPA otherwise.

    SDPA handles packed rows too (transformers turns the restarting position
    ids into a block-diagonal mask), but computes the masked blocks as well;
    the varlen kernel skips them.
    """
    if requested == "varlen":
        if device != "cuda" or not packing:
            raise ConfigError("train.attention: varlen runs on CUDA with train.packing: true; use auto or sdpa")
        return register_varlen_attention()
    if requested == "auto" and packing and device == "cuda":
        return register_varlen_attention()
    return "sdpa"


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


class _Offloaded:
    """One saved tensor's trip to CPU memory and back (or its stay, for the last ones saved)."""

    __slots__ = ("cpu", "device", "gpu", "home", "index", "numel", "ready", "shared")

    def __init__(self, tensor, index: int) -> None:
        self.gpu: Any = tensor  # until its trip starts
        self.cpu: Any = None
        self.home = True  # not sent yet: backward may take it as it is
        self.device, self.index, self.shared, self.numel = tensor.device, index, False, tensor.numel()
        self.ready: Any = None


class ActivationOffload:
    """The inputs of checkpointed layers (or half layers: recompute.py) go to pinned
    CPU memory during the forward pass and come back for the backward pass, so
    GPU memory no longer grows with the number of layers times the micro-batch.

    Used with reentrant checkpointing, whose only saved tensors are each
    checkpoint's inputs: a saved-tensor hook moves exactly those. The copies run
    on a side stream, so the GPU keeps computing while they travel; in backward,
    the next checkpoints' inputs are fetched while the current one recomputes. A
    tensor every checkpoint saves travels once. `stash` and `fetch` send other
    tensors the same way (recompute.py: attention outputs), in the same order.

    A tensor leaves only once RESIDENT later ones have been saved, so the last
    ones of a forward pass (the last layer's, which backward needs first) never
    make the round trip that backward would have to wait for.
    """

    MIN_ELEMENTS = 1 << 16  # smaller tensors stay where they are: their trip costs more than their memory
    PREFETCH = 3  # items looked at behind the one in use
    RESIDENT = 5  # one LLaMA layer's items (attention output, log-sum-exp, two inputs) and the final norm's input

    def __init__(self) -> None:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._stream = None
        self._order: list[_Offloaded] = []  # this forward pass's offloads, in the order they were saved
        self._seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, offload): one trip per tensor

    # The three device operations: CUDA streams here; tests replace them to check the bookkeeping.
    def _offloadable(self, tensor) -> bool:
        return tensor.is_cuda and tensor.numel() >= self.MIN_ELEMENTS

    def _side_stream(self, device):
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _copy_out(self, tensor):
        """Queue the trip to pinned CPU memory on the side stream; returns the CPU tensor."""
        import torch

        side = self._side_stream(tensor.device)
        cpu = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is fully written first
        with torch.cuda.stream(side):
            cpu.copy_(tensor, non_blocking=True)
        tensor.record_stream(side)  # its GPU memory is not reused until the copy is done
        return cpu

    def _copy_in(self, item: _Offloaded) -> None:
        """Queue the trip back on the side stream, after its trip out."""
        import torch

        side = self._side_stream(item.device)
        with torch.cuda.stream(side):
            item.gpu = item.cpu.to(item.device, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(side)

    def _arrived(self, item: _Offloaded):
        """The tensor back on the GPU, once the compute stream has waited for it."""
        import torch

        compute = torch.cuda.current_stream(item.device)
        compute.wait_event(item.ready)
        item.gpu.record_stream(compute)
        return item.gpu

    def _pack(self, tensor):
        import weakref

        if not self._offloadable(tensor):
            return tensor
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            seen[1].shared = True
            return seen[1]
        item = _Offloaded(tensor, len(self._order))
        self._order.append(item)
        self._seen[id(tensor)] = (weakref.ref(tensor), item)
        if len(self._order) > self.RESIDENT:
            self._send(self._order[-self.RESIDENT - 1])
        return item

    def _send(self, item: _Offloaded) -> None:
        if item.home and item.gpu is not None:
            item.cpu, item.gpu, item.home = self._copy_out(item.gpu), None, False

    def _unpack(self, item):
        if not isinstance(item, _Offloaded):
            return item
        if item.home:  # never sent: it is where it was made
            tensor = item.gpu
            if tensor is None:
                raise RuntimeError("an offloaded activation was asked for twice")
            if not item.shared:
                item.gpu = None
            return tensor
        if item.gpu is None:
            if item.cpu is None:
                raise RuntimeError("an offloaded activation was asked for twice")
            self._copy_in(item)
        # Backward uses the items in reverse: start the ones before this one now, up to
        # the second as large as it (small ones, like a log-sum-exp, ride along), so a
        # trip has a whole half layer's recompute to finish in.
        # (Only for this forward pass's items: another pass's index points into another list.)
        if item.index < len(self._order) and self._order[item.index] is item:
            large = 0
            for earlier in reversed(self._order[max(0, item.index - self.PREFETCH):item.index]):
                if earlier.gpu is None and earlier.cpu is not None:
                    self._copy_in(earlier)
                large += earlier.numel >= item.numel
                if large == 2:
                    break
        tensor = self._arrived(item)
        if not item.shared:  # used once: let both copies go
            item.gpu = item.cpu = None
        return tensor

    def stash(self, tensor):
        """Send a tensor made in a checkpoint's first pass on the trip; `fetch` gives it back."""
        return self._pack(tensor)

    def fetch(self, handle):
        """The stashed tensor, back on its device (once)."""
        return self._unpack(handle)

    def attach(self, decoder) -> None:
        """Offload for the duration of the decoder stack's forward pass."""
        stack = contextlib.ExitStack()

        def enter(module, args, kwargs):
            if module.training:
                self._order, self._seen = [], {}
                stack.enter_context(self._hooks)

        def leave(module, args, kwargs, output):
            stack.close()
            self._seen = {}  # the ids of tensors freed later must not match new ones

        decoder.register_forward_pre_hook(enter, with_kwargs=True)
        decoder.register_forward_hook(leave, with_kwargs=True)
