"""Evaluation metrics per model, and the loss it reports."""

import math

import pytest
import torch

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
    for i, l in zip(ids, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([i])).logits[0, :-1]
        target = torch.tensor(l[1:])
        mask = target != -100
        total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        count += int(mask.sum())
    assert got == pytest.approx(total / count, rel=1e-5)
    assert math.isfinite(got)
