"""Activation offload: tensors a checkpointed forward pass saves go to pinned CPU memory and back for backward."""

from __future__ import annotations

import contextlib
from typing import Any


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
