"""Base model preparation and loading: tiny build, HF cache offline, clear errors, 4-bit on CPU."""

import hashlib
import json
import shutil

import pytest
import torch

from conftest import params_for
from sabia_ift.base_model import prepare_base
from sabia_ift.errors import ConfigError, ModelError
from sabia_ift.modeling import (
    check_target_modules,
    disable_cpu_repack,
    load_model,
    model_folder,
    resolve_base,
    snapshot,
)
from sabia_ift.toy.tiny_model import build_tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_tiny_model_and_tokenizer(tiny_base, tokenizer):
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 32000
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    # Portuguese round-trips through the 32k sentencepiece vocabulary.
    text = "Não há ação sem reação; você está certo."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert list(tiny_base.glob("*.safetensors")) and not list(tiny_base.glob("*.bin"))
    meta = json.loads((tiny_base / "base.json").read_text())
    assert meta["source"] == "tiny"
    assert meta["details"]["pretrain_last_loss"] < meta["details"]["pretrain_first_loss"]


def test_tiny_build_is_deterministic(tmp_path):
    cfg = params_for("base.tiny", pretrain_documents=48, pretrain_epochs=1, pretrain_batch=4)
    digests = []
    for name in ("a", "b"):
        build_tiny_model(cfg, tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_base):
    """A Hugging Face cache holding org/tiny at commit SHA, with the Hub unreachable."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / SHA
    shutil.copytree(tiny_base, snapshot)
    (snapshot / "base.json").unlink()
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pinned_hub_model_loads_from_cache_offline(hf_cache, tmp_path):
    cfg = params_for("base", source="pretrained", name_or_path="org/tiny", revision=SHA)
    info = prepare_base(cfg, tmp_path / "base")
    assert info == {"source": "hub", "name_or_path": "org/tiny", "revision": SHA, "requested_revision": SHA}
    ref = resolve_base(tmp_path / "base")
    folder = model_folder(ref)
    assert folder.name == SHA
    model = load_model(folder, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    assert model.config.vocab_size == 32000


def test_branch_revision_is_resolved_to_its_commit(hf_cache, tmp_path, caplog):
    cfg = params_for("base", source="pretrained", name_or_path="org/tiny", revision="main")
    info = prepare_base(cfg, tmp_path / "b")
    assert info["revision"] == SHA and info["requested_revision"] == "main"
    assert "Pin that sha" in caplog.text


def test_unreachable_hub_with_empty_cache_names_the_model(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    with pytest.raises(ModelError) as err:
        prepare_base(params_for("base", source="pretrained", name_or_path="org/absent", revision=SHA), tmp_path / "b")
    message = str(err.value)
    assert "org/absent" in message and SHA in message and "HF_TOKEN" in message
    assert "hf_secret_never_printed" not in message
    assert not (tmp_path / "b").exists()


def test_local_folder_without_safetensors_is_refused(tiny_base, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_base, folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        prepare_base(params_for("base", source="pretrained", name_or_path=str(folder)), tmp_path / "b")


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="neither an existing folder nor a Hub id"):
        prepare_base(params_for("base", source="pretrained", name_or_path=str(tmp_path / "nope")), tmp_path / "b")


def test_local_folder_base(tiny_base, tmp_path):
    info = prepare_base(params_for("base", source="pretrained", name_or_path=str(tiny_base)), tmp_path / "b")
    assert info["source"] == "local"
    assert model_folder(resolve_base(tmp_path / "b")) == tiny_base


def test_missing_base_stage_output(tmp_path):
    with pytest.raises(ModelError, match="run the base stage first"):
        resolve_base(tmp_path)


def test_unknown_lora_target_is_named(tiny_base):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    check_target_modules(model, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="train.lora.target_modules: query_key_value not in the model"):
        check_target_modules(model, ["q_proj", "query_key_value"])


def _lora_grad_norms_around_an_eval(tiny_base, tokenizer, fix: bool) -> tuple[list[float], list[float]]:
    """Train 3 steps, run one eval-mode no-grad forward, train 3 more; return losses and LoRA grad norms."""
    from sabia_ift.train.training import build_model

    cfg = params_for("train", quantization="nf4",
                     lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    model = build_model(cfg, tiny_base, "cpu", torch.float32)
    if not fix:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tokenizer("Abaixo está uma instrução. Responda em português, por favor.")["input_ids"]])
    losses, norms = [], []
    for step in range(6):
        if step == 3:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5))
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, norms


def test_4bit_lora_keeps_learning_after_an_eval_pass_on_cpu(tiny_base, tokenizer):
    """DESIGN.md's bitsandbytes CPU trap: after an eval forward, LoRA gradients silently became zero."""
    losses, norms = _lora_grad_norms_around_an_eval(tiny_base, tokenizer, fix=True)
    assert all(n > 0 for n in norms)
    assert losses[5] < losses[3] < losses[0]  # still learning after the eval pass


def test_the_trap_is_real_without_the_fix(tiny_base, tokenizer):
    """Proves the test above can fail: with the repack allowed, gradients die after the eval pass."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks: the trap cannot spring here")
    _, norms = _lora_grad_norms_around_an_eval(tiny_base, tokenizer, fix=False)
    assert all(n > 0 for n in norms[:3]) and all(n == 0 for n in norms[3:])


def test_disable_cpu_repack_counts_layers(tiny_base):
    model = load_model(tiny_base, quantization="nf4", double_quant=True, dtype=torch.float32, device="cpu")
    # 2 layers x 7 linear projections, lm_head stays in full precision.
    assert disable_cpu_repack(model) == 14


def test_a_bug_inside_the_hub_client_is_not_reworded_as_a_missing_model(monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise AttributeError("a bug, not a missing model")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(AttributeError):
        snapshot("org/tiny", SHA, local_only=True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("404 Not Found")))
    with pytest.raises(ModelError, match="org/tiny at revision"):
        snapshot("org/tiny", SHA, local_only=True)
