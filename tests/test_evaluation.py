"""Evaluation metrics per model, and the loss it reports."""

import json
import math

import pytest
import torch

from conftest import params_for, save_lora_adapter
from sabia_ift.artifacts import PROMPT_SCORES
from sabia_ift.evaluation.evaluation import score, token_loss
from sabia_ift.evaluation.generation import Generation
from sabia_ift.modeling import load_model


def test_score(offline_metric):
    gens = [Generation("A capital é Fortaleza.", 6, True), Generation("sim sim sim sim sim sim", 48, False)]
    refs = ["A capital é Fortaleza.", "Sim."]
    s, per_prompt = score(gens, refs, ngram=2)
    assert s["eos_stop_rate"] == 0.5 and s["exact_match"] == 0.5
    assert s["mean_new_tokens"] == 27.0
    # rep-2: the first answer repeats nothing, the second 4 of its 5 bigrams.
    assert 0.5 < s["rougeL"] < 1 and s["repetition"] == pytest.approx(0.4)

    # Per prompt: the same scores before averaging, with sentence-level chrF.
    first, second = per_prompt
    assert first == {"eos_stop": 1, "rougeL": 1.0, "chrf": 100.0, "exact_match": 1, "repetition": 0.0,
                     "new_tokens": 6}
    assert (second["eos_stop"], second["exact_match"], second["new_tokens"]) == (0, 0, 48)
    assert second["repetition"] == pytest.approx(0.8) and 0 < second["rougeL"] < 1
    assert 0 < second["chrf"] < 100
    for key, aggregate in PROMPT_SCORES.items():
        if key != "chrf":  # eval.json holds the corpus-level chrF, not the mean of the sentences'
            assert s[aggregate] == pytest.approx(sum(p[key] for p in per_prompt) / 2, abs=1e-4), key


def test_token_loss_is_the_mean_over_trained_tokens(tiny_base, tokenizer):
    import datasets

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    ids = [tokenizer("Olá, tudo bem com você?")["input_ids"], tokenizer("Sim, obrigado.")["input_ids"]]
    labels = [[-100, -100, *i[2:]] for i in ids]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    got = token_loss(model, tokenizer, data, batch_size=2, device="cpu")
    # Reference: one row at a time, summed by hand, so padding can play no part.
    total, count = 0.0, 0
    for i, label in zip(ids, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([i])).logits[0, :-1]
        target = torch.tensor(label[1:])
        mask = target != -100
        total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        count += int(mask.sum())
    assert got == pytest.approx(total / count, rel=1e-5)
    assert math.isfinite(got)


@pytest.fixture(scope="module")
def short_context_base(tiny_base, tmp_path_factory):
    """The tiny base with a 64-token context, so prompts run into it."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("short") / "base"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def adapter(short_context_base, tmp_path_factory):
    """An untrained LoRA adapter, saved as the train stage saves one."""
    return save_lora_adapter(short_context_base, tmp_path_factory.mktemp("adapter") / "adapter", r=2,
                             targets=("q_proj",))


def prepare(tmp_path, tokenizer, splits):
    from sabia_ift.data.tokenization import tokenize
    from sabia_ift.io import write_jsonl
    from sabia_ift.template import build_prompt

    n = 0
    for split, outputs in splits.items():
        rows = []
        for output in outputs:
            n += 1
            rows.append({"prompt": build_prompt(f"Pergunta {n}?"), "response": output, "instruction": f"Pergunta {n}?",
                         "input": "", "source_row": n})
        write_jsonl(tmp_path / "formatted" / f"{split}.jsonl", rows)
    tokenize(params_for("tokenize", max_length=64, max_drop_share=1), tokenizer, 64, tmp_path / "formatted",
             tmp_path / "tokenized")


def loading_of(adapter) -> dict:
    from sabia_ift.artifacts import LOADING_KEYS, TrainMeta

    meta = TrainMeta.read(adapter)
    return {key: getattr(meta, key) for key in LOADING_KEYS}


def run_evaluate(tmp_path, base, adapter, **cfg):
    """evaluate_base, then evaluate reading it: the two stages, as dvc.yaml runs them."""
    from sabia_ift.evaluation.evaluation import evaluate, evaluate_base
    from sabia_ift.io import read_jsonl

    config = params_for("evaluate", device="cpu", **cfg)
    evaluate_base(config, loading_of(adapter), base, tmp_path / "formatted", tmp_path / "tokenized",
                  tmp_path / "base")
    metrics = evaluate(config, base, adapter, tmp_path / "formatted", tmp_path / "tokenized", tmp_path / "base",
                       tmp_path / "samples.jsonl", tmp_path / "prompts.jsonl")
    return metrics, read_jsonl(tmp_path / "samples.jsonl")


def test_base_results_pair_with_the_tuned_ones_and_stale_ones_are_refused(short_context_base, adapter, tokenizer,
                                                                          tmp_path, offline_metric):
    import contextlib

    import torch

    from sabia_ift.artifacts import HF_SPLITS, load_tokenized
    from sabia_ift.errors import DataError
    from sabia_ift.evaluation.evaluation import evaluate, test_prompts
    from sabia_ift.evaluation.generation import generate
    from sabia_ift.io import read_jsonl, write_json
    from sabia_ift.modeling import load_tuned

    prepare(tmp_path, tokenizer, {"train": ["Sim."], "val": ["Não."], "test": ["Um.", "Dois.", "Três."]})
    metrics, samples = run_evaluate(tmp_path, short_context_base, adapter, max_new_tokens=8)
    prompts = read_jsonl(tmp_path / "prompts.jsonl")
    assert [p["source_row"] for p in prompts] == [s["source_row"] for s in samples] == [3, 4, 5]
    assert set(metrics) >= {"samples", "base", "tuned", "delta"} and metrics["samples"] == 3
    # The base half, computed without the adapter, is what the adapter switched off generates.
    _, model = load_tuned(short_context_base, adapter, "cpu")
    _, ids = test_prompts(tmp_path / "formatted", load_tokenized(tmp_path / "tokenized")[HF_SPLITS["test"]], None)
    for switch, side in ((model.disable_adapter(), "base"), (contextlib.nullcontext(), "tuned")):
        with switch, torch.inference_mode():
            texts = [g.text for g in generate(model, tokenizer, ids, max_new_tokens=8, batch_size=4, device="cpu",
                                              context_length=64)]
        assert texts == [s[side] for s in samples], side
    config = params_for("evaluate", device="cpu", max_new_tokens=8)
    args = (short_context_base, adapter, tmp_path / "formatted", tmp_path / "tokenized", tmp_path / "base",
            tmp_path / "s.jsonl", tmp_path / "p.jsonl")
    # Another max_new_tokens, other prompts, or another way of loading the base: refused, never paired.
    with pytest.raises(DataError, match="max_new_tokens is 8, this evaluation's is 9"):
        evaluate(params_for("evaluate", device="cpu", max_new_tokens=9), *args)
    with pytest.raises(DataError, match="samples is 3, this evaluation's is 2"):
        evaluate(params_for("evaluate", device="cpu", max_new_tokens=8, max_samples=2), *args)
    lines = (tmp_path / "base" / "prompts.jsonl").read_text().splitlines()
    (tmp_path / "base" / "prompts.jsonl").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    with pytest.raises(DataError, match="row 1 is not the test prompt"):
        evaluate(config, *args)
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    write_json(tmp_path / "base" / "summary.json", {**summary, "loading": {**summary["loading"], "precision": "bf16"}})
    (tmp_path / "base" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="train.precision"):
        evaluate(config, *args)


def test_evaluate_asks_what_tokenize_kept_within_the_context(short_context_base, adapter, tokenizer, tmp_path,
                                                             offline_metric):
    prepare(tmp_path, tokenizer, {"train": ["Sim."], "val": ["Não."],
                                  "test": ["Um.", "palavra " * 100, "Três.", "Quatro."]})
    metrics, samples = run_evaluate(tmp_path, short_context_base, adapter, max_new_tokens=48, max_samples=2)
    # Row 4 (the long one) was dropped by tokenize: never generated for, never scored.
    assert [s["source_row"] for s in samples] == [3, 5]
    assert metrics["samples"] == 2 and metrics["context_length"] == 64 and metrics["capped_by_context"] == 2
    for name in ("base", "tuned"):
        prompt = max(len(tokenizer(s["prompt"])["input_ids"]) for s in samples)
        assert 0 < metrics[name]["mean_new_tokens"] <= 64 - prompt
        assert metrics[name]["val_loss"] > 0


def test_evaluate_without_a_test_split(short_context_base, adapter, tokenizer, tmp_path, offline_metric):
    """format.test_size: 0: no generation, said in the metrics; the validation loss is still measured."""
    import json

    from sabia_ift.io import write_json

    prepare(tmp_path, tokenizer, {"train": ["Sim."], "val": ["Não."], "test": []})
    metrics, samples = run_evaluate(tmp_path, short_context_base, adapter)
    assert metrics["samples"] == 0 and "format.test_size: 0" in metrics["skipped"] and samples == []
    assert "eos_stop_rate" not in metrics["tuned"] and metrics["tuned"]["val_loss"] > 0
    prepare(tmp_path / "none", tokenizer, {"train": ["Sim."], "val": [], "test": []})
    metrics, _ = run_evaluate(tmp_path / "none", short_context_base, adapter)
    assert metrics["base"]["val_loss"] is None and metrics["delta"] == {}
    write_json(tmp_path / "eval.json", metrics)
    json.loads((tmp_path / "eval.json").read_text())
