"""Split checkpointing: the gradients of no checkpointing, with frozen output projections computed once."""

import copy

import pytest
import torch

from conftest import peft_model
from sabia_ift.modeling import load_model
from sabia_ift.train.offload import ActivationOffload
from sabia_ift.train.recompute import split_checkpointing


def _peft(base, targets):
    model = peft_model(base, targets, 4, b_std=0.05)
    model.config.use_cache = False
    return model


def _step(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


class _HostOffload(ActivationOffload):
    """The offload's bookkeeping on CPU: every large tensor is cloned out and back, and counted."""

    MIN_ELEMENTS = 64
    RESIDENT = 0  # every item makes the trip

    def __init__(self):
        super().__init__()
        self.shapes_out, self.fetched = [], 0

    def _offloadable(self, tensor):
        return tensor.numel() >= self.MIN_ELEMENTS

    def _copy_out(self, tensor):
        self.shapes_out.append(tuple(tensor.shape))
        return tensor.detach().clone()

    def _copy_in(self, item):
        item.gpu, item.ready = item.cpu.clone(), True
        self.fetched += 1

    def _arrived(self, item):
        return item.gpu


def _split(model, offload=None):
    """What the train stage does for gradient_checkpointing: offload."""
    split = copy.deepcopy(model)
    split.get_base_model().enable_input_require_grads()
    offload = offload or ActivationOffload()
    offload.attach(split.get_base_model().model)
    return split, split_checkpointing(split, offload)


def _count_real_forwards(model, names):
    calls = {"n": 0}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and hasattr(module, "_sabia_forward"):
            original = module._sabia_forward

            def counted(*args, _original=original, **kwargs):
                calls["n"] += 1
                return _original(*args, **kwargs)

            module._sabia_forward = counted
    return calls


@pytest.mark.parametrize(("quantization", "tolerance"), [("none", 1e-5), ("nf4", 2e-3)])
def test_split_halves_give_the_gradients_of_no_checkpointing(tiny_base, quantization, tolerance):
    base = load_model(tiny_base, quantization=quantization, double_quant=True, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "v_proj", "up_proj"])
    split, (layers, skipped) = _split(plain)
    assert (layers, skipped) == (plain.config.num_hidden_layers, 2 * plain.config.num_hidden_layers)
    ids = torch.randint(3, plain.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    loss_p, grads_p = _step(plain, ids)
    calls = _count_real_forwards(split, {"o_proj", "down_proj"})
    activations = {"n": 0}
    for name, module in split.named_modules():
        if name.endswith("mlp.act_fn"):
            module.register_forward_hook(lambda *_: activations.__setitem__("n", activations["n"] + 1))
    loss_s, grads_s = _step(split, ids)
    # Each frozen output projection, and the activation feeding down_proj, ran once
    # (the first pass), not again in the recompute.
    assert calls["n"] == 2 * plain.config.num_hidden_layers
    assert activations["n"] == plain.config.num_hidden_layers
    torch.testing.assert_close(loss_s, loss_p)
    assert grads_s.keys() == grads_p.keys() and len(grads_p) == 2 * 3 * plain.config.num_hidden_layers
    for name in grads_p:
        assert grads_p[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=tolerance, atol=tolerance * 1e-2, msg=name)


def test_tuned_output_projections_are_recomputed(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "o_proj", "down_proj"])
    split, (layers, skipped) = _split(plain)
    assert skipped == 0
    ids = torch.randint(3, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(6))
    loss_p, grads_p = _step(plain, ids)
    loss_s, grads_s = _step(split, ids)
    torch.testing.assert_close(loss_s, loss_p)
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)


def test_evaluation_runs_the_layers_whole(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "v_proj"])
    split, _ = _split(plain)
    ids = torch.randint(3, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    plain.eval()
    split.eval()
    calls = _count_real_forwards(split, {"o_proj", "down_proj"})
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert calls["n"] == 2 * plain.config.num_hidden_layers


def test_attention_runs_once_and_its_backward_reads_the_first_pass(tiny_base, monkeypatch):
    from sabia_ift.train import attention

    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "k_proj", "v_proj", "o_proj"])
    offload = _HostOffload()
    split, _ = _split(plain, offload)
    ids = torch.randint(3, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(8))
    loss_p, grads_p = _step(plain, ids)

    calls = {"first": 0, "sdpa": 0}
    first = attention._cpu_attention_forward
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_first(*args):
        calls["first"] += 1
        return first(*args)

    def counted_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention, "_cpu_attention_forward", counted_first)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    loss_s, grads_s = _step(split, ids)
    layers = plain.config.num_hidden_layers
    # One attention forward per layer (the first pass), none in the recompute, and no SDPA at all.
    assert calls == {"first": layers, "sdpa": 0}
    # Per layer: the attention output and log-sum-exp, the layer input and the middle
    # of the layer went out (and the final norm's input); everything came back.
    heads, dim = plain.config.num_attention_heads, plain.config.hidden_size // plain.config.num_attention_heads
    assert offload.shapes_out.count((2, 24, heads, dim)) == layers
    assert offload.shapes_out.count((2, heads, 24)) == layers
    assert offload.shapes_out.count((2, 24, plain.config.hidden_size)) == 2 * layers + 1
    assert offload.fetched == len(offload.shapes_out)
    torch.testing.assert_close(loss_s, loss_p)
    for name in grads_p:  # o_proj is tuned: its input is the reused attention output
        assert grads_p[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_with_a_padding_mask_is_recomputed(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "v_proj"])
    split, _ = _split(plain, _HostOffload())
    ids = torch.randint(3, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    for model in (plain, split):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for (name, p), (_, s) in zip(plain.named_parameters(), split.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(s.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("length", "kept"), [(64, True), (16, False)])
def test_backward_dequantises_each_4bit_weight_once_when_the_batch_is_large(tiny_base, monkeypatch, length, kept):
    import collections

    import bitsandbytes.functional as bnbf

    from sabia_ift.train import fused_lora

    base = load_model(tiny_base, quantization="nf4", double_quant=True, dtype=torch.float32, device="cpu")
    plain = _peft(base, ["q_proj", "v_proj"])
    fused_lora.fuse_lora(plain)
    split, _ = _split(plain)
    quantized = {m.weight.data_ptr(): n for n, m in split.named_modules()
                 if getattr(getattr(m, "weight", None), "quant_state", None) is not None}
    assert len(quantized) == 7 * plain.config.num_hidden_layers
    # 2 x 64 tokens: as many as the projections' inputs have features, so the weights are kept.
    ids = torch.randint(3, plain.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(10))
    split.train()
    loss = split(input_ids=ids, labels=ids).loss

    counts = collections.Counter()
    dequantize = bnbf.dequantize_4bit

    def counted(weight, *args, **kwargs):
        counts[quantized[weight.data_ptr()]] += 1
        return dequantize(weight, *args, **kwargs)

    monkeypatch.setattr(bnbf, "dequantize_4bit", counted)
    loss.backward()
    # The recompute dequantises q/k/v/gate/up and their backward reuses it; o/down only in backward.
    # With fewer tokens a kept weight would outweigh its output: dequantised again.
    again = {n for n in quantized.values() if not n.endswith(("o_proj", "down_proj"))}
    want = {n: 1 if kept or n not in again else 2 for n in quantized.values()}
    assert counts == collections.Counter(want)
