"""Packed-row attention: rows of one length take the dense path and match each row's own attention."""

import pytest
import torch

from sabia_ift.train import attention, offload

HEADS, DIM = 2, 8


def _packed(lengths):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, sum(lengths), DIM, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return q, k, v, kw


def _row_by_row(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)  # (1, tokens, heads, dim), as the attention function returns


def test_rows_of_one_length_match_each_row_alone_in_values_and_gradients():
    lengths = [5, 5, 5]
    q, k, v, kw = _packed(lengths)
    out, _ = attention._varlen_attention(None, q, k, v, None, scaling=DIM ** -0.5, **kw)
    assert out.shape == (1, 15, HEADS, DIM)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = _row_by_row(q, k, v, lengths)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(got, torch.autograd.grad(ref_out, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, r)


def test_rows_of_mixed_lengths_go_to_the_varlen_kernel(monkeypatch):
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((q.shape, cu_q.tolist(), max_q))
        return torch.zeros_like(q)

    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen)
    q, k, v, kw = _packed([5, 3, 5])
    out, _ = attention._varlen_attention(None, q, k, v, None, scaling=None, **kw)
    assert calls == [((13, HEADS, DIM), [0, 5, 8, 13], 5)] and out.shape == (1, 13, HEADS, DIM)


def test_without_row_boundaries_it_is_sdpa():
    q, k, v, _ = _packed([4, 4])
    out, _ = attention._varlen_attention(torch.nn.Module(), q, k, v, None, scaling=None, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_varlen_needs_packed_rows_on_cuda():
    from sabia_ift.errors import ConfigError

    with pytest.raises(ConfigError, match="train.attention: varlen"):
        attention.attention_implementation("varlen", packing=True, device="cpu")
    assert attention.attention_implementation("auto", packing=True, device="cpu") == "sdpa"


class _HostOffload(offload.ActivationOffload):
    """The offload bookkeeping with the CUDA copies replaced by CPU clones that are logged."""

    MIN_ELEMENTS = 16

    def __init__(self):
        super().__init__()
        self.log = []

    def _offloadable(self, tensor):
        return tensor.numel() >= self.MIN_ELEMENTS

    def _copy_out(self, tensor):
        self.log.append(("out", tuple(tensor.shape)))
        return tensor.detach().clone()

    def _copy_in(self, item):
        self.log.append(("in", self._order.index(item)))
        item.gpu, item.ready = item.cpu.clone(), True

    def _arrived(self, item):
        self.log.append(("use", self._order.index(item)))
        return item.gpu


class _Stack(torch.nn.Module):
    """Decoder-like layers under reentrant checkpointing, each also given one shared tensor (like cos/sin)."""

    def __init__(self, layers=4, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x, shared):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(lambda h, s, layer=layer: torch.tanh(layer(h) * s), x, shared, use_reentrant=True)
        return x


def _offloaded_stack(resident: int) -> _HostOffload:
    """Train the stack once with and once without the offload; the gradients must agree."""
    x = torch.randn(4, 8, requires_grad=True)
    shared = torch.rand(4, 8) + 0.5
    plain = _Stack()
    plain(x, shared).sum().backward()
    want = [p.grad.clone() for p in plain.parameters()] + [x.grad.clone()]
    x.grad = None

    stack, offload = _Stack(), _HostOffload()
    offload.RESIDENT = resident
    offload.attach(stack)
    stack(x, shared).sum().backward()
    for g, w in zip([p.grad for p in stack.parameters()] + [x.grad], want, strict=True):
        torch.testing.assert_close(g, w)
    return offload


def test_offload_moves_each_layer_input_once_prefetches_the_next_two_and_keeps_gradients():
    offload = _offloaded_stack(resident=0)
    # Four layer inputs and the shared tensor, each out once; the shared one is the second saved.
    assert [e for e in offload.log if e[0] == "out"] == [("out", (4, 8))] * 5
    ins = [e[1] for e in offload.log if e[0] == "in"]
    assert sorted(ins) == list(range(5))  # everything came back exactly once
    uses = [e for e in offload.log if e[0] != "out"]
    # Backward starts at the last layer and fetches the inputs of the two layers before it at once.
    assert uses[:4] == [("in", 4), ("in", 3), ("in", 2), ("use", 4)]
    assert all(item.cpu is None for i, item in enumerate(offload._order) if not item.shared)
    assert sum(item.shared for item in offload._order) == 1


def test_the_last_items_saved_stay_on_the_device():
    offload = _offloaded_stack(resident=2)
    # Five items saved; the inputs of the last two layers never left, the other three went and came back.
    assert [e for e in offload.log if e[0] == "out"] == [("out", (4, 8))] * 3
    assert sorted(e[1] for e in offload.log if e[0] == "in") == [0, 1, 2]
    assert {e[1] for e in offload.log if e[0] == "use"} == {0, 1, 2}  # 3 and 4 were used where they were


def test_offload_leaves_small_tensors_and_evaluation_alone():
    stack, offload = _Stack(width=2), _HostOffload()
    offload.attach(stack)
    x = torch.randn(2, 2, requires_grad=True)
    stack(x, torch.ones(2, 2)).sum().backward()  # 4 elements: below MIN_ELEMENTS
    assert offload.log == []
    stack.eval()
    with torch.no_grad():
        stack(torch.randn(4, 2), torch.ones(4, 2))
    assert offload.log == []
