"""Merge and export: the merged model is the tuned model and answers like it; the card says what it is
and how to ask it; nothing the command did not write is ever deleted; pushing needs the Hub."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, save_lora_adapter
from sabia_ift.artifacts import TrainMeta
from sabia_ift.errors import ConfigError, DataError, ModelError, OutputError
from sabia_ift.serve import export as export_module
from sabia_ift.serve.export import agreement_rows, export, measure_agreement, merge, portable_adapter, resolve_dtype

DOC = REPO / "docs" / "bad-input.md"
QUERY = "model.layers.0.self_attn.q_proj.weight"


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
def held_out(tuned_adapter):
    """The held-out rows the tuned adapter's fixture wrote beside it (formatted, as data/formatted holds them)."""
    return tuned_adapter.parent / "test.jsonl"


@pytest.fixture(scope="module")
def export_log():
    return []


@pytest.fixture(scope="module")
def merged(tiny_base, tuned_adapter, project_files, held_out, export_log, tmp_path_factory):
    """`sabia-ift export --merged` with its defaults (dtype auto), comparing answers on 4 test prompts."""
    out = tmp_path_factory.mktemp("merged") / "model"
    return merge(tiny_base, tuned_adapter, out, device="cpu", prompts=held_out, check_prompts=4,
                 log=export_log.append, **project_files)


def card_code(folder) -> str:
    card = (folder / "README.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


# --- The merged model is the evaluated model ---------------------------------------------------


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


def test_default_dtype_is_the_one_the_model_was_evaluated_in(merged, export_log):
    """On CPU the tiny model is evaluated in fp32: a bf16 export answers differently on some prompts."""
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert "merged model written to" in export_log[-2] and "(fp32," in export_log[-2]


@pytest.mark.parametrize(("quantization", "precision", "expected"), [
    ("none", "auto", "fp32"),   # CPU: generate and evaluate run in fp32
    ("nf4", "auto", "bf16"),    # a 4-bit base computes in bf16 (modeling.load_model)
    ("nf4", "fp32", "bf16"),
    ("none", "bf16", "bf16"),   # an explicit train.precision is what evaluation used
    ("none", "fp16", "fp16"),
])
def test_auto_dtype_follows_how_the_adapter_is_evaluated(quantization, precision, expected):
    meta = TrainMeta(quantization=quantization, double_quant=False, precision=precision, base={})
    assert resolve_dtype("auto", meta, "cpu") == expected
    assert resolve_dtype("fp32", meta, "cpu") == "fp32"


def test_export_measures_agreement_with_the_evaluated_model(merged, export_log):
    assert export_log[-1].startswith("agreement with the evaluated model: 4 of 4 greedy answers equal")
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "Weights in fp32 (`--dtype auto`: the dtype `sabia-ift generate` runs the adapter in on cpu)" in card
    assert "on **4 of 4** test prompts (100%)" in card


def test_agreement_tells_a_different_model_apart(tiny_base, tuned_adapter, held_out, tmp_path):
    """The check can fail: the base without the adapter, asked the same way, answers differently."""
    from sabia_ift.io import read_jsonl
    from sabia_ift.modeling import load_tokenizer
    from sabia_ift.template import chat_template_for

    plain = tmp_path / "plain"
    shutil.copytree(tiny_base, plain)
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.chat_template = chat_template_for(tokenizer)
    tokenizer.save_pretrained(str(plain))
    agreement = measure_agreement(plain, tiny_base, tuned_adapter, read_jsonl(held_out)[:2], "test", "cpu",
                                  max_new_tokens=16)
    assert agreement.prompts == 2 and agreement.agreeing < 2


def test_merged_folder_stands_alone(merged):
    from transformers import AutoTokenizer, GenerationConfig

    assert sorted(p.name for p in merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    assert not (merged / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    generation = GenerationConfig.from_pretrained(str(merged))
    assert generation.eos_token_id == tokenizer.eos_token_id == 2
    assert generation.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert generation.do_sample is False and generation.max_new_tokens == 128


def test_exported_files_have_normal_permissions(merged):
    mask = os.umask(0)
    os.umask(mask)
    assert oct(merged.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in merged.iterdir()}
    assert modes["model.safetensors"] == oct(0o666 & ~mask)  # save_pretrained writes it 0600
    assert set(modes.values()) == {oct(0o666 & ~mask)}


# --- It is asked the way it was trained --------------------------------------------------------


def test_chat_template_gives_the_training_ids_on_every_sample_prompt(merged, tokenizer):
    """Every bundled prompt, through the exported tokenizer's chat template as the card shows it:
    exactly the ids training and evaluation fed the model, one BOS."""
    from transformers import AutoTokenizer

    from sabia_ift.template import build_prompt, encode_prompt

    exported = AutoTokenizer.from_pretrained(str(merged))
    rows = [json.loads(line) for line in (REPO / "data/sample/instructions.jsonl").read_text().splitlines()]
    assert len(rows) == 1200 and sum(bool(r["input"]) for r in rows) > 500
    wrong = []
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": row["instruction"], "input": row["input"]}]
        ids = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        if ids != encode_prompt(tokenizer, build_prompt(row["instruction"], row["input"])):
            wrong.append(i + 1)
    assert wrong == []


def test_card_snippet_answers_as_sabia_ift_generate(merged, tiny_base, tuned_adapter, capsys):
    from sabia_ift.cli import main

    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "`<s>` + the prompt" not in card and "add no BOS of your own" in card
    code = card_code(merged).replace("path/to/this/folder", str(merged))
    with_input = code.replace('"content": "Quanto é 3 mais 4?", "input": ""',
                              '"content": "Ordene as palavras.", "input": "uva, abacaxi"')
    assert with_input != code
    asked = ((code, ["Quanto é 3 mais 4?"]), (with_input, ["Ordene as palavras.", "--input", "uva, abacaxi"]))
    for snippet, args in asked:
        capsys.readouterr()
        exec(compile(snippet, "card", "exec"), {})
        card_answer = capsys.readouterr().out
        assert main(["generate", *args, "--base", str(tiny_base), "--adapter", str(tuned_adapter),
                     "--device", "cpu"]) == 0
        assert card_answer == capsys.readouterr().out != "\n"


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


# --- 4-bit: dequantised before merging, never merged into 4-bit weights ------------------------


@pytest.fixture(scope="module")
def nf4_adapter(tiny_base, tmp_path_factory):
    """An adapter as a QLoRA run leaves it (train.quantization: nf4), made on the 4-bit tiny base.

    Its LoRA weights are random rather than trained (training on 4-bit CPU kernels takes minutes);
    what the merge must get right is how it loads the base, not what the adapter learned.
    """
    return save_lora_adapter(tiny_base, tmp_path_factory.mktemp("qlora") / "adapter", quantization="nf4",
                             random_scale=0)


def lora_delta(adapter):
    """scale * B @ A of layer 0's q_proj, from the adapter's own files."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
    return (b.float() @ a.float()) * (config["lora_alpha"] / config["r"])


def merged_tensors(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    return tensors


def test_qlora_adapter_merges_into_the_full_precision_base(tiny_base, nf4_adapter, tmp_path):
    """The adapter's meta says nf4; the base is still loaded unquantised, so the merged weight is
    exactly base + LoRA (an NF4 base would be off by its rounding, far above the tolerance)."""
    import torch
    from safetensors.torch import load_file

    out = merge(tiny_base, nf4_adapter, tmp_path / "out", dtype="fp32", device="cpu", check_prompts=0)
    base = load_file(str(tiny_base / "model.safetensors"))
    tensors = merged_tensors(out)
    assert set(tensors) == set(base) and {t.dtype for t in tensors.values()} == {torch.float32}
    torch.testing.assert_close(tensors[QUERY], base[QUERY].float() + lora_delta(nf4_adapter), atol=1e-6, rtol=1e-5)


def test_4bit_stored_base_is_dequantised_then_merged(tiny_base, nf4_adapter, tmp_path):
    """A base folder whose weights are saved in 4-bit (a pre-quantised model) used to merge into
    4-bit weights and then fail on save with NotImplementedError."""
    import bitsandbytes.functional as bnb_functional
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sabia_ift.modeling import load_model

    stored = tmp_path / "base4"
    load_model(tiny_base, quantization="nf4", double_quant=True, dtype=torch.float32, device="cpu"
               ).save_pretrained(str(stored))
    for name in ("base.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, stored / name)
    out = merge(stored, nf4_adapter, tmp_path / "out", dtype="fp32", device="cpu", check_prompts=0)
    tensors = merged_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert set(tensors) == set(load_file(str(tiny_base / "model.safetensors")))
    weight = AutoModelForCausalLM.from_pretrained(str(stored)).model.layers[0].self_attn.q_proj.weight
    dequantised = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    original = load_file(str(tiny_base / "model.safetensors"))[QUERY].float()
    assert (dequantised - original).abs().max() > 1e-3  # the 4-bit base is not the original
    torch.testing.assert_close(tensors[QUERY], dequantised + lora_delta(nf4_adapter), atol=1e-5, rtol=1e-4)


def test_merging_into_4bit_is_refused(tiny_base, tuned_adapter, tmp_path):
    with pytest.raises(ConfigError, match="merging into 4-bit weights is refused"):
        merge(tiny_base, tuned_adapter, tmp_path / "out", dtype="nf4")
    assert not (tmp_path / "out").exists()


# --- No command deletes what it did not write --------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tiny_base, tuned_adapter, tmp_path_factory):
    """A project checkout after `dvc repro`: dvc.yaml, models/base, models/adapter, data, metrics."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(tiny_base, root / "models" / "base")
    shutil.copytree(tuned_adapter, root / "models" / "adapter")
    shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
    (root / "metrics").mkdir()
    (root / "keep").mkdir()
    (root / "keep" / "notes.txt").write_text("mine")
    os.symlink(root / "models", root / "link-to-models")
    return root


def snapshot(root):
    """Every path under root's parent: a refused export must leave all of it as it was."""
    return sorted(str(p.relative_to(root.parent)) for p in root.parent.rglob("*"))


REFUSALS = [
    ("merged-dot", [".", "--overwrite"],
     "error: --merged .: refused, even with --overwrite: it is the project root; write to a folder of its own, "
     "such as models/merged"),
    ("merged-models", ["models"],
     "error: --merged models: refused, even with --overwrite: it holds models/base, the base model it reads; "
     "write to a folder of its own, such as models/merged"),
    ("merged-adapter", ["models/adapter", "--overwrite"],
     "error: --merged models/adapter: refused, even with --overwrite: it is models/adapter, the adapter it "
     "reads; write to a folder of its own, such as models/merged"),
    ("merged-inside-adapter", ["models/adapter/merged"],
     "error: --merged models/adapter/merged: refused, even with --overwrite: it is inside models/adapter, the "
     "adapter it reads; write to a folder of its own, such as models/merged"),
    ("merged-in-data", ["data/merged"],
     "error: --merged data/merged: refused, even with --overwrite: it is inside data/, the project's data; "
     "write to a folder of its own, such as models/merged"),
    ("merged-metrics", ["metrics", "--overwrite"],
     "error: --merged metrics: refused, even with --overwrite: it is metrics/, the project's metrics; "
     "write to a folder of its own, such as models/merged"),
    ("merged-parent", ["..", "--overwrite"],
     "error: --merged ..: refused, even with --overwrite: it holds the project root; write to a folder of its "
     "own, such as models/merged"),
    ("merged-not-empty", ["keep"],
     "error: --merged keep: exists and is not empty; nothing is deleted that this command did not write: "
     "choose a new folder, or pass --overwrite to replace this one"),
    ("merged-is-a-file", ["keep/notes.txt", "--overwrite"],
     "error: --merged keep/notes.txt: exists and is not a folder; choose another path"),
    ("dtype-nf4", ["models/merged", "--dtype", "nf4"],
     "error: --dtype nf4: merging into 4-bit weights is refused: rounding the merged weights to 4 bits would "
     "lose most of the LoRA update. Merge in bf16 or fp32 (auto picks the dtype the model was evaluated in); "
     "quantise the merged model afterwards if you need it small, and evaluate it again"),
]


@pytest.mark.parametrize(("args", "line"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_export_refuses_folders_it_did_not_write(checkout, monkeypatch, capsys, args, line):
    from sabia_ift.cli import main

    monkeypatch.chdir(checkout)
    before = snapshot(checkout)
    assert main(["export", "--device", "cpu", "--merged", *args]) == 2
    err = capsys.readouterr().err
    assert err == line + "\n"
    assert snapshot(checkout) == before  # nothing written, moved or left behind (no .tmp-*)
    assert line in DOC.read_text(encoding="utf-8"), "docs/bad-input.md must show this exact line"


@pytest.mark.parametrize("target", ["link-to-models", "link-to-models/base", "{adapter}", "{adapter}/..", "{base}",
                                   "models/base/", "./models/../models/adapter", "models/checkpoints/x"])
def test_any_spelling_of_a_protected_folder_is_refused(checkout, monkeypatch, target):
    monkeypatch.chdir(checkout)
    target = target.format(adapter=checkout / "models/adapter", base=checkout / "models/base")
    before = snapshot(checkout)
    with pytest.raises(ConfigError, match="refused, even with --overwrite"):
        merge("models/base", "models/adapter", target, device="cpu", overwrite=True)
    assert snapshot(checkout) == before


def test_overwrite_replaces_only_when_asked_and_a_failure_keeps_the_old_folder(tiny_base, tuned_adapter,
                                                                               tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "write_card", full_disk)
        # The merge is written, the card fails: the full disk is reported naming the export folder.
        with pytest.raises(OutputError, match=r"out: cannot be written: No space left"):
            merge(tiny_base, tuned_adapter, out, device="cpu", overwrite=True, check_prompts=0)
        with pytest.raises(OutputError, match="No space left"):
            merge(tiny_base, tuned_adapter, tmp_path / "new" / "deeper" / "out", device="cpu", check_prompts=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp-*, no parent folders made
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    mask = os.umask(0o027)
    try:
        merge(tiny_base, tuned_adapter, out, device="cpu", overwrite=True, check_prompts=0)
    finally:
        os.umask(mask)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


def test_merged_export_folder_is_ignored_by_git():
    """The README's own export path must never be committed (or copied into `dvc exp run --temp`)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "check-ignore", "-q", "models/merged/model.safetensors"], cwd=REPO)
    assert found.returncode == 0


def test_cli_defaults():
    from sabia_ift.cli import parser

    args = parser().parse_args(["export", "--merged", "models/merged"])
    assert (args.dtype, args.device, args.overwrite, args.check_prompts) == ("auto", "auto", False, 8)
    assert args.prompts == "data/formatted/test.jsonl"
    # The card's snippet, the agreement check and `sabia-ift generate` answer at the same length.
    from sabia_ift.model_card import GENERATE_SNIPPET

    generate = parser().parse_args(["generate", "Oi"])
    assert generate.max_new_tokens == export_module.MAX_NEW_TOKENS == 128
    assert f"max_new_tokens={export_module.MAX_NEW_TOKENS}," in GENERATE_SNIPPET


def test_prompts_without_instructions_are_refused(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"prompt": "Abaixo está...", "response": "x"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: row 1: --prompts takes rows with a text 'instruction'"):
        agreement_rows(bad, 8)
    assert agreement_rows(bad, 0) == ([], "not measured (--check-prompts 0)")


# --- Publishing --------------------------------------------------------------------------------


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

    from sabia_ift.template import build_prompt, encode_prompt

    folder = portable_adapter(tuned_adapter, tiny_base, tmp_path / "adapter", **project_files, repo_id="me/ad")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and 'PeftModel.from_pretrained(base, "me/ad")' in card
    assert "apply_chat_template(messages" in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The README's line for a local base: the base by absolute path, the adapter from anywhere.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Olá"}], add_generation_prompt=True)["input_ids"]
    assert ids == encode_prompt(tokenizer, build_prompt("Olá"))
    assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == 32000
