"""What the train stage adds to the adapter folder: its tokenizer and a card (no machine paths)."""

from sabia_ift.model_card import gather, render, save_adapter_extras


def test_adapter_extras_make_the_folder_stand_alone(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_adapter_extras(tmp_path, tokenizer, {"epochs": 3, "lr": 0.002}, {"name_or_path": "models/base"})
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("Olá, mundo")["input_ids"] == tokenizer("Olá, mundo")["input_ids"]
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "epochs: 3\nlr: 0.002" in card and "### Resposta:\n{output}</s>" in card
    # A local base must be named by absolute path wherever the adapter is loaded.
    assert 'AutoModelForCausalLM.from_pretrained("/absolute/path/to/models/base")' in card
    assert str(tmp_path) not in card


def test_hub_base_card_names_base_and_revision(tmp_path):
    facts = gather({"name_or_path": "maritaca-ai/sabia-7b", "revision": "a" * 40}, params=None,
                   manifest=tmp_path / "absent.json", metrics_dir=tmp_path)
    card = render(facts, "adapter")
    assert "base_model: maritaca-ai/sabia-7b" in card and f"revision `{'a' * 40}`" in card
    assert "AutoPeftModelForCausalLM.from_pretrained(" in card
    assert "adds metrics/*.json" in card and "adds the data source and its revision" in card
