"""Merge and export: the merged model is the tuned model; the card says what it is; pushing needs the Hub."""

from __future__ import annotations

import json

import pytest
import yaml

from sabia_ift.errors import ConfigError, ModelError
from sabia_ift.serve.export import export, merge, portable_adapter


@pytest.fixture(scope="module")
def project_files(tmp_path_factory):
    """params.yaml, a data manifest and metrics, as a project checkout holds them after `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1, "lr": 0.003}}))
    (root / "manifest.json").write_text(json.dumps({
        "source": "hub", "dataset": "org/dados", "revision": "0123abcd" * 5, "split": "train",
        "rows_written": 300, "rows_in_source": 1000, "max_rows": 300, "seed": 42}))
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text(json.dumps({
        "samples": 16, "max_new_tokens": 24,
        "base": {"eos_stop_rate": 0.0, "rougeL": 0.1}, "tuned": {"eos_stop_rate": 0.875, "rougeL": 0.3}}))
    return {"params": root / "params.yaml", "manifest": root / "manifest.json", "metrics_dir": root / "metrics"}


@pytest.fixture(scope="module")
def merged(tiny_base, tuned_adapter, project_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    return merge(tiny_base, tuned_adapter, out, dtype="fp32", **project_files)


def test_merged_model_gives_the_tuned_logits_without_peft(merged, tiny_base, tuned_adapter):
    import torch
    from transformers import AutoModelForCausalLM

    from sabia_ift.modeling import load_tuned
    from sabia_ift.template import build_prompt, encode_prompt

    tokenizer, tuned = load_tuned(tiny_base, tuned_adapter, "cpu")
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert "peft" not in type(plain).__module__ and not hasattr(plain, "peft_config")
    ids = torch.tensor([encode_prompt(tokenizer, build_prompt("Quanto é 3 mais 4?"))])
    with torch.no_grad():
        expected, got = tuned(input_ids=ids).logits, plain(input_ids=ids).logits
        with tuned.disable_adapter():
            base = tuned(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the model, so the check can fail
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merged_folder_stands_alone(merged):
    from transformers import AutoTokenizer, GenerationConfig

    assert sorted(p.name for p in merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    assert not (merged / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    generation = GenerationConfig.from_pretrained(str(merged))
    assert generation.eos_token_id == tokenizer.eos_token_id == 2
    assert generation.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_model_card_has_base_data_template_params_and_metrics(merged):
    card = (merged / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["language"] == ["pt"]
    assert "`org/dados`, split `train`, revision `" + "0123abcd" * 5 in card
    assert "### Instrução:\n{instruction}\n\n### Resposta:\n{output}</s>" in card
    assert "### Entrada:\n{input}" in card
    assert "epochs: 1\nlr: 0.003" in card
    assert "| tuned | 0.875 | 0.3 |" in card
    assert "AutoModelForCausalLM.from_pretrained(" in card


def test_merging_into_4bit_is_refused(tiny_base, tuned_adapter, tmp_path):
    with pytest.raises(ConfigError, match="merging into 4-bit weights is refused"):
        merge(tiny_base, tuned_adapter, tmp_path / "out", dtype="nf4")
    assert not (tmp_path / "out").exists()


def test_push_offline_fails_clearly_before_merging(tiny_base, tuned_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(ModelError, match="cannot push to me/modelo: HF_HUB_OFFLINE is set") as err:
        export(tiny_base, tuned_adapter, merged=tmp_path / "out", push_to="me/modelo")
    assert "hf_not_a_real_token" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_export_needs_something_to_do(tiny_base, tuned_adapter):
    with pytest.raises(ConfigError, match="nothing to export"):
        export(tiny_base, tuned_adapter, merged=None, push_to=None)


def test_cli_export_error_is_one_line(tiny_base, tuned_adapter, capsys, monkeypatch):
    from sabia_ift.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", "--base", str(tiny_base), "--adapter", str(tuned_adapter), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot push to me/x: HF_HUB_OFFLINE is set") and err.count("\n") == 1


def test_portable_adapter_loads_from_another_directory(tiny_base, tuned_adapter, project_files, tmp_path,
                                                       monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = portable_adapter(tuned_adapter, tiny_base, tmp_path / "adapter", **project_files, repo_id="me/ad")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and 'PeftModel.from_pretrained(base, "me/ad")' in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The README's line for a local base: the base by absolute path, the adapter from anywhere.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("Olá", add_special_tokens=False)["input_ids"]]])
    assert model(input_ids=ids).logits.shape[-1] == 32000
