"""The fused LoRA projection computes what peft's LoRA forward computes, gradients included."""

import copy
import logging

import pytest
import torch

from conftest import peft_model
from sabia_ift.modeling import load_model
from sabia_ift.train.fused_lora import fuse_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(base, targets=TARGETS, dropout=0.0):
    return peft_model(base, targets, 8, b_std=0.02, dropout=dropout)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_matches_peft_in_loss_logits_and_every_lora_gradient(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft_model(base)
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 7 * fused.config.num_hidden_layers
    ids = torch.randint(3, fused.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (plain, fused):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), out.loss.detach(), _lora_grads(model)))
    (logits_p, loss_p, grads_p), (logits_f, loss_f, grads_f) = outs
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_p) == 2 * 7 * fused.config.num_hidden_layers
    for name in grads_p:
        assert grads_p[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_switched_off_or_merged_gives_peft_results(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    fused = _peft_model(base, targets=["q_proj", "v_proj"])
    fuse_lora(fused)
    ids = torch.randint(3, fused.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    fused.eval()
    with torch.no_grad():
        tuned = fused(input_ids=ids).logits
        with fused.disable_adapter():
            off = fused(input_ids=ids).logits
        bare = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
        torch.testing.assert_close(off, bare(input_ids=ids).logits)
        assert not torch.allclose(tuned, off)
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, tuned, rtol=1e-4, atol=1e-4)


def test_layers_with_dropout_keep_peft_forward_and_say_so(tiny_base, caplog):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    model = _peft_model(base, targets=["q_proj"], dropout=0.1)
    with caplog.at_level(logging.INFO, logger="sabia_ift.train.fused_lora"):
        assert fuse_lora(model) == 0
    assert "LoRA dropout > 0" in caplog.text


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_projection_matches_the_dequantised_reference(tiny_base, double_quant):
    """On a 4-bit base, the fused path dequantises the same weights bitsandbytes uses."""
    import bitsandbytes.functional as bnbf

    base = load_model(tiny_base, quantization="nf4", double_quant=double_quant, dtype=torch.float32, device="cpu")
    model = _peft_model(base, targets=["q_proj"])
    fuse_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    out = layer(x)  # fp32 input: the fused path computes in fp32
    ref = x_ref @ weight.t() + s * (x_ref @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    da, db, dx = torch.autograd.grad(out, (a, b, x), grad)
    ra, rb, rx = torch.autograd.grad(ref, (a, b, x_ref), grad)
    for got, want in ((da, ra), (db, rb), (dx, rx)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_gradients(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft_model(base, targets=["q_proj", "v_proj"])
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    ids = torch.randint(3, fused.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    losses, grads = [], []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_lora_grads(model))
    assert all(g.dtype == torch.float32 for g in grads[1].values())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)  # bf16 rounding, fused differently
    for name in grads[0]:
        cos = torch.nn.functional.cosine_similarity(grads[0][name].flatten(), grads[1][name].flatten(), dim=0)
        assert cos > 0.99, name


def test_siblings_of_one_input_are_projected_in_one_call_and_nothing_stays_pending(tiny_base, monkeypatch):
    from sabia_ift.train import fused_lora

    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    model = _peft_model(base)
    fuse_lora(model)
    calls = []
    real = fused_lora._project
    monkeypatch.setattr(fused_lora, "_project", lambda products, x, layers, names: calls.append(len(layers)) or
                        real(products, x, layers, names))
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
    layers = model.config.num_hidden_layers
    # q/k/v, o, gate/up: three calls a layer; down runs with the SwiGLU (test below)
    assert sorted(calls) == sorted([3, 1, 2] * layers)
    groups = {id(m._sabia_group): m._sabia_group for m in model.modules() if hasattr(m, "_sabia_group")}
    assert len(groups) == 2 * layers and all(g["pending"] is None for g in groups.values())


def test_siblings_called_on_different_inputs_or_partly_used_match_peft(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    plain = _peft_model(base, targets=["q_proj", "k_proj", "v_proj"])
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    hidden = fused.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 6, hidden, generator=gen), torch.randn(2, 6, hidden, generator=gen)
    grads = []
    for model in (plain, fused):
        attn = model.base_model.model.model.layers[0].self_attn
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        # q from one input, k and v from another (as cross-attention would); v's output is never used
        q, k, _ = attn.q_proj(a), attn.k_proj(b), attn.v_proj(b)
        (q.square().sum() + (k * 3).sum()).backward()
        lora = {n: p.grad for n, p in attn.named_parameters() if "lora" in n}
        grads.append((q.detach(), k.detach(), a.grad, b.grad, lora))
    (q_p, k_p, a_p, b_p, lora_p), (q_f, k_f, a_f, b_f, lora_f) = grads
    for got, want in ((q_f, q_p), (k_f, k_p), (a_f, a_p), (b_f, b_p)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, want in lora_p.items():
        if "v_proj" in name:  # v's output took no part in the loss
            assert lora_f[name] is None or not lora_f[name].any(), name
        else:
            torch.testing.assert_close(lora_f[name], want, rtol=1e-4, atol=1e-6, msg=name)


def _saved_widths(model, ids):
    """Activations autograd keeps for backward (weights aside), by their last dimension's size
    (elements summed, each storage once)."""
    seen, widths = set(), {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter):
            return t
        key = (t.untyped_storage().data_ptr(), t.shape[-1] if t.dim() else 0)
        if key not in seen:
            seen.add(key)
            widths[key[1]] = widths.get(key[1], 0) + t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, widths


def test_a_lora_down_projection_keeps_no_copy_of_the_swiglu_and_gives_the_same_gradients(tiny_base):
    from sabia_ift.train import fused_lora

    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    together = _peft_model(base)
    fuse_lora(together)
    apart = copy.deepcopy(together)
    for mlp in (m for m in apart.modules() if hasattr(m, "_unfused_forward")):
        mlp.forward = mlp._unfused_forward  # down projection fused alone, the SwiGLU left to autograd
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    width = base.config.intermediate_size
    results = []
    for model in (apart, together):
        model.train()
        loss, widths = _saved_widths(model, ids)
        loss.backward()
        results.append((loss.detach(), widths.get(width, 0), _lora_grads(model)))
    (loss_a, wide_a, grads_a), (loss_t, wide_t, grads_t) = results
    tokens, layers = ids.numel(), base.config.num_hidden_layers
    # gate's and up's outputs, a layer; without the function also silu(gate) and the product.
    assert wide_t == 2 * tokens * width * layers
    assert wide_a == 4 * tokens * width * layers
    assert torch.equal(loss_t, loss_a)
    for name in grads_a:
        assert torch.equal(grads_t[name], grads_a[name]), name
    assert sum(hasattr(m, "_unfused_forward") for m in together.modules()) == layers
    assert fused_lora._swiglu_down.cache_info().currsize == 1
