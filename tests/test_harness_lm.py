"""ContinuationHFLM: lm-eval's log-likelihoods, from the continuation's logits only."""

from __future__ import annotations

import random

import pytest
import torch

from sabia_ift.evaluation.harness_lm import ContinuationHFLM, continuation_positions

WORDS = ("casa", "gato", "cão", "livro", "mesa", "sol", "lua", "rio", "mar", "céu", "pão", "vinho", "janela", "porta")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base):
    from transformers import AutoModelForCausalLM

    from sabia_ift.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_base)


def requests(n_contexts: int, words: tuple[int, int], seed: int = 0) -> list:
    """Multiple-choice-like requests: each context with one-token and longer continuations."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    out = []
    for _ in range(n_contexts):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "\nResposta:"
        for continuation in (" A", " B", " C", " o gato preto", " sol"):
            out.append(Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation),
                                idx=len(out)))
    return out


def lm(cls, model_and_tokenizer, max_length: int = 2048, batch_size: int = 4):
    model, tokenizer = model_and_tokenizer
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def test_continuation_positions_are_the_last_of_each_row():
    assert continuation_positions([5, 3, 1], 2).tolist() == [[3, 4], [1, 2], [0, 0]]


@pytest.mark.parametrize("max_length", [2048, 48], ids=["whole prompts", "prompts cut from the left"])
def test_the_same_loglikelihoods_as_lm_evals_hflm(model_and_tokenizer, max_length):
    from lm_eval.models.huggingface import HFLM

    asked = requests(7, (3, 80))
    stock = lm(HFLM, model_and_tokenizer, max_length).loglikelihood(asked, disable_tqdm=True)
    ours = lm(ContinuationHFLM, model_and_tokenizer, max_length).loglikelihood(asked, disable_tqdm=True)
    assert len(ours) == len(stock) == 35
    for (ll, greedy), (ll_stock, greedy_stock) in zip(ours, stock, strict=True):
        assert ll == pytest.approx(ll_stock, abs=1e-5) and greedy == greedy_stock
    # The continuations differ, so the numbers do: a comparison of constants would prove nothing.
    assert len({round(ll, 3) for ll, _ in ours}) > 20


def projected_shapes(lm_eval_model, asked) -> list[torch.Size]:
    """The shape of every logits tensor the vocabulary projection produced while scoring `asked`."""
    shapes = []
    head = lm_eval_model.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    try:
        lm_eval_model.loglikelihood(asked, disable_tqdm=True)
    finally:
        handle.remove()
    return shapes


def test_logits_do_not_grow_with_the_prompt(model_and_tokenizer):
    """Only the continuation's positions reach the vocabulary: (batch, longest continuation, vocab),
    for 10-word prompts as for 400-word ones, where lm-eval's HFLM projects every position."""
    from lm_eval.models.huggingface import HFLM

    vocab = model_and_tokenizer[0].config.vocab_size
    short, long = requests(4, (10, 10), seed=1), requests(4, (400, 400), seed=1)
    ours = {name: projected_shapes(lm(ContinuationHFLM, model_and_tokenizer), asked)
            for name, asked in (("short", short), ("long", long))}
    longest_continuation = len(model_and_tokenizer[1](" o gato preto", add_special_tokens=False).input_ids)
    for shapes in ours.values():
        assert max(s[0] for s in shapes) <= 4 and all(s[2] == vocab for s in shapes)
        assert max(s[1] for s in shapes) == longest_continuation
    assert max(s.numel() for s in ours["long"]) == max(s.numel() for s in ours["short"])
    stock = projected_shapes(lm(HFLM, model_and_tokenizer), long)
    assert max(s[1] for s in stock) > 400  # every position of the prompt, as this test would see without the fix


def test_bars_only_on_a_terminal(model_and_tokenizer, capsys):
    """lm-eval's evaluator asks for every bar; in a log (capsys is no terminal) each is one long line."""
    from lm_eval.models.huggingface import HFLM

    asked = requests(2, (3, 6))
    lm(HFLM, model_and_tokenizer).loglikelihood(asked)
    assert "Running loglikelihood requests" in capsys.readouterr().err  # lm-eval's own model draws it
    lm(ContinuationHFLM, model_and_tokenizer).loglikelihood(asked)
    assert capsys.readouterr().err == ""


def generation_requests(n: int) -> list:
    """Instruction prompts (the trained test model answers them with confidence, so batch sizes
    do not flip near-tied tokens) in two groups of options: a newline stop, and stops that cut
    inside answers (a space, a letter), so the cut and its whitespace are compared too. The first
    five belong to one task, the rest to another."""
    from lm_eval.api.instance import Instance

    from sabia_ift.template import build_prompt
    from sabia_ift.toy.sample import generate_rows

    out = []
    for k, row in enumerate(generate_rows(1)[:n]):
        options = ({"until": ["\n"], "do_sample": False, "max_gen_toks": 8} if k % 2 else
                   {"until": [" ", "a"], "do_sample": False, "max_gen_toks": 6})
        out.append(Instance(request_type="generate_until", doc={},
                            arguments=(build_prompt(row["instruction"], row.get("input", "")), options), idx=k,
                            metadata=("first" if k < 5 else "second", k, 1)))
    return out


@pytest.mark.parametrize("max_length", [2048, 40], ids=["whole prompts", "prompts cut from the left"])
def test_fast_generation_answers_as_lm_evals_hflm(tuned_adapter, tiny_base, max_length, monkeypatch):
    """The benchmark's fast engine gives lm-eval's own generate_until strings, request by request."""
    from lm_eval.models.huggingface import HFLM

    from sabia_ift.evaluation import generation
    from sabia_ift.modeling import load_tuned

    tokenizer, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    plain = generation.inference_copy(model, merge=True)
    asked = generation_requests(9)
    stock = lm(HFLM, (plain, tokenizer), max_length).generate_until(asked, disable_tqdm=True)
    calls = []
    real = generation.fast_generate
    monkeypatch.setattr(generation, "fast_generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    fast = lm(ContinuationHFLM, (plain, tokenizer), max_length)
    fast.fast_generation = True
    ours = fast.generate_until(asked, disable_tqdm=True)
    # One call a task and group of options, every request through the fast engine.
    assert sorted(calls) == [2, 2, 2, 3]
    assert ours == stock
    assert len(set(stock)) >= 2  # differing answers, not one constant, were compared
