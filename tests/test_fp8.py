"""FP8 frozen products (train.base_matmul: fp8): torch's real FP8 kernel on CPU, checked against
the dense products within e4m3's rounding, through the fused LoRA, the routed frozen layers and
the train stage."""

import copy

import pytest
import torch

from conftest import params_for, peft_model, tokenized_split
from sabia_ift.modeling import load_model
from sabia_ift.train.fp8 import FP8_TARGET, Fp8Products, quantise_rows, route_frozen
from sabia_ift.train.fused_lora import fuse_lora
from sabia_ift.train.training import train
from sabia_ift.train.weights import DENSE

# e4m3 keeps 3 mantissa bits: a value rounds within 2^-4 of itself. A product of two such
# operands over a few hundred terms of random sign lands about 3.7% (relative Frobenius) from
# the exact one; the bound leaves room for that, not for a wrong scale (which is off by x2 or more).
PRODUCT_BOUND = 0.05


def _relative(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_quantise_within_e4m3_rounding_and_never_overflow(dtype):
    t = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    t[1] *= 1e4  # an outlier row keeps its own scale
    t[2] = 0  # a zero row quantises to zeros, not NaN
    t[3, 7] = -t[3].abs().max() * 3  # the row's largest magnitude, negative
    q, scale = quantise_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    # 440 rounds to e4m3's largest finite value, 448; nothing beyond it (a cast there is NaN).
    assert torch.isfinite(back).all() and q.float().abs().max() == 448 > FP8_TARGET
    # Relative rounding 2^-4, plus e4m3's smallest subnormal step (2^-9 of the scale) near zero.
    assert ((back - t.float()).abs() <= t.float().abs() * 2**-4 + scale * 2**-9).all()
    assert back[2].abs().sum() == 0
    assert _relative(back[1], t[1]) < 0.05 and _relative(back[0], t[0]) < 0.05


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_frozen_products_match_dense_within_fp8_rounding(tiny_base, quantization):
    model = load_model(tiny_base, quantization=quantization, double_quant=True, dtype=torch.float32, device="cpu")
    products = Fp8Products()
    gen = torch.Generator().manual_seed(1)
    for base in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        x = torch.randn(40, base.in_features, generator=gen)
        g = torch.randn(40, base.out_features, generator=gen)
        dense = torch.zeros(40, base.out_features)
        DENSE.add_frozen(dense, x, base, torch.float32, 40)
        fp8 = torch.zeros(40, base.out_features)
        products.add_frozen(fp8, products.prepare(x), base, torch.float32, 40)
        assert 0 < _relative(fp8, dense) < PRODUCT_BOUND
        dense_grad, fp8_grad = torch.zeros_like(x), torch.zeros_like(x)
        DENSE.add_input_grad(dense_grad, g, base, torch.float32)
        products.add_input_grad(fp8_grad, g, base, torch.float32)
        assert 0 < _relative(fp8_grad, dense_grad) < PRODUCT_BOUND
    # One FP8 copy a weight, one byte a parameter, built once however often it is read.
    assert products.bytes == sum(b.in_features * b.out_features for b in (model.model.layers[0].self_attn.q_proj,
                                                                           model.model.layers[1].mlp.down_proj))


def test_one_scale_a_weight_keeps_rows_a_thousand_times_smaller():
    """e4m3 rounds alike across 2^-6..448: rows 1,000 times below the largest keep their precision."""
    gen = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(256, 128, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(128, 256, generator=gen) * torch.logspace(-3, 0, 128).view(-1, 1))
    x, g = torch.randn(200, 256, generator=gen), torch.randn(200, 128, generator=gen)
    products = Fp8Products()
    out = products.product(products.prepare(x), base, torch.float32)
    for rows in (slice(0, 16), slice(56, 72), slice(112, 128)):  # the smallest rows, middle ones, the largest
        assert _relative(out[:, rows], x @ base.weight[rows].t()) < PRODUCT_BOUND, rows
    assert _relative(products.input_grad(g, base, torch.float32), g @ base.weight) < PRODUCT_BOUND


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_gpu(), reason="needs an FP8 GPU (Ada, Hopper or later)")
def test_products_on_an_fp8_gpu():
    """The CUDA kernel's layouts (row-major activations, column-major weights) and bf16 output."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    base = torch.nn.Linear(512, 1024, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
    products = Fp8Products()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = products.product(products.prepare(x), base, torch.bfloat16)
        dx = products.input_grad(g, base, torch.bfloat16)
    assert out.dtype == dx.dtype == torch.bfloat16
    assert _relative(out, x.float() @ base.weight.float().t()) < PRODUCT_BOUND
    assert _relative(dx, g.float() @ base.weight.float()) < PRODUCT_BOUND


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [True, False])
def test_fp8_model_trains_the_same_lora_within_fp8_rounding(tiny_base, fused):
    base = load_model(tiny_base, quantization="nf4", double_quant=True, dtype=torch.float32, device="cpu")
    dense = peft_model(base, ["q_proj", "v_proj", "down_proj"], 8, b_std=0.02)
    fp8 = copy.deepcopy(dense)
    products = Fp8Products()
    layers = fp8.config.num_hidden_layers
    if fused:
        assert fuse_lora(fp8, products) == 3 * layers
    # Every frozen projection (7 a layer, the LoRA layers' bases included), never the LM head.
    assert route_frozen(fp8, products) == 7 * layers
    assert fp8.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward
    ids = torch.randint(3, fp8.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    loss_d, grads_d = _loss_and_grads(dense, ids)
    loss_f, grads_f = _loss_and_grads(fp8, ids)
    assert products.bytes > 0  # the FP8 path ran
    assert abs(float(loss_f / loss_d) - 1) < 0.01
    assert grads_f.keys() == grads_d.keys()
    for name in grads_d:
        # Gradients pass through two layers of FP8 products each way: looser than one product.
        assert _relative(grads_f[name], grads_d[name]) < 0.15, name
    assert loss_f != loss_d  # the products really were FP8


def test_fp8_under_bf16_autocast_as_the_trainer_runs_a_gpu(tiny_base):
    base = load_model(tiny_base, quantization="nf4", double_quant=True, dtype=torch.bfloat16, device="cpu")
    dense = peft_model(base, ["q_proj", "v_proj"], 8, b_std=0.02)
    fp8 = copy.deepcopy(dense)
    products = Fp8Products()
    fuse_lora(fp8, products)
    route_frozen(fp8, products)
    ids = torch.randint(3, fp8.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    results = []
    for model in (dense, fp8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())  # the fp32 masters' gradients
        results.append((out.loss.detach(), grads))
    (loss_d, grads_d), (loss_f, grads_f) = results
    assert abs(float(loss_f / loss_d) - 1) < 0.01
    for name in grads_d:
        assert _relative(grads_f[name], grads_d[name]) < 0.15, name


def test_fp8_is_refused_where_it_cannot_run():
    from sabia_ift.errors import ConfigError

    for overrides, message in (({"gradient_checkpointing": "offload"}, "base_matmul: fp8 .* not offload"),
                               ({"precision": "fp16"}, "base_matmul: fp8 .* not fp16"),
                               ({}, None)):
        if message is None:
            assert params_for("train", base_matmul="fp8").base_matmul == "fp8"
            continue
        with pytest.raises(ConfigError, match=message):
            params_for("train", base_matmul="fp8", **overrides)
    with pytest.raises(ConfigError, match="train.base_matmul"):
        params_for("train", base_matmul="fp4")


def test_a_gpu_without_fp8_is_a_clear_error(monkeypatch):
    from sabia_ift.errors import ConfigError
    from sabia_ift.train.fp8 import check_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"train.base_matmul: fp8 needs .*A100.* is 8.0"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_device("cuda")
    check_device("cpu")


def test_train_stage_in_fp8_follows_the_dense_loss_curve(tiny_base, tokenizer, tmp_path):
    data = tokenized_split(tmp_path / "data", tokenizer, 96, 64, 16)
    settings = dict(epochs=1, micro_batch_size=8, lr=3e-3, logging_steps=1, eval_steps=100, save_steps=100,
                    quantization="nf4", report_to=[],
                    lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    curves = {}
    for name, mode, checkpointing in (("dense", "dense", "off"), ("fp8", "fp8", "off"), ("fp8-on", "fp8", "on")):
        cfg = params_for("train", base_matmul=mode, gradient_checkpointing=checkpointing, **settings)
        metrics, timings = train(cfg, tiny_base, data, tmp_path / name, tmp_path / f"ckpt-{name}", None)
        curves[name] = timings["train_loss_by_step"]
        assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert curves["fp8"].keys() == curves["dense"].keys() and len(curves["dense"]) == 8
    for step, loss in curves["dense"].items():
        assert abs(curves["fp8"][step] / loss - 1) < 0.02, step
    assert curves["fp8"] != curves["dense"]
    # The layer recompute runs the same FP8 products again: the same curve to the bit.
    assert curves["fp8-on"] == curves["fp8"]


def test_choosing_fp8_warns_that_it_is_experimental(caplog):
    from sabia_ift.train.hot_path import before_load

    with caplog.at_level("WARNING", logger="sabia_ift.train.hot_path"):
        before_load(params_for("train", base_matmul="fp8", kernels="none"), "cpu")
    assert "base_matmul: fp8 is experimental" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sabia_ift.train.hot_path"):
        before_load(params_for("train", kernels="none"), "cpu")
    assert "experimental" not in caplog.text
