"""The fixed-cache greedy decoder answers as transformers' generate, batch after batch."""

import pytest
import torch

from sabia_ift.evaluation import decoding
from sabia_ift.evaluation.generation import generate
from sabia_ift.modeling import load_model, load_tuned
from sabia_ift.template import build_prompt, encode_prompt


def _prompts(tokenizer, count=10):
    from sabia_ift.toy.sample import generate_rows

    rows = generate_rows(3)[:count]
    return [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]


def _decoder(model, tokenizer, rows, slots, new):
    return decoding.GreedyDecoder(model, rows=rows, slots=slots, max_new_tokens=new,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def _as_generate(tokenizer, answers):
    """generate's token ids (EOS left out) from the decoder's (EOS kept)."""
    eos = tokenizer.eos_token_id
    return [tuple(a[:-1]) if a and a[-1] == eos else tuple(a) for a in answers]


def test_batches_answer_as_generate_across_cache_lengths(tuned_adapter, tiny_base, tokenizer, monkeypatch):
    """Two batches through one decoder, padding rows beside the prompts, and attention reading
    the cache through several lengths (a small SLOT_STEP) give generate's answers."""
    from sabia_ift.evaluation.generation import inference_copy

    monkeypatch.setattr(decoding, "SLOT_STEP", 8)
    _, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    prompts = _prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 3
    lengths = []
    for plain in (inference_copy(model, merge=False), inference_copy(model, merge=True)):
        want = [g.token_ids for g in generate(plain, tokenizer, prompts, max_new_tokens=40, batch_size=1,
                                              device="cpu")]
        decoder = _decoder(plain, tokenizer, rows=6, slots=max(map(len, prompts)) + 40, new=40)
        got = _as_generate(tokenizer, decoder.decode(prompts[:6], 40) + decoder.decode(prompts[6:], 40))
        assert got == want
        lengths.append({len(w) for w in want})
    assert lengths[0] == {40} and max(lengths[1]) < 40  # the base runs on through 6 lengths; the tuned stops


def test_a_smaller_budget_and_a_reused_decoder(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompts = _prompts(tokenizer, 4)
    decoder = _decoder(model, tokenizer, rows=4, slots=max(map(len, prompts)) + 20, new=20)
    decoder.decode(prompts, 20)
    want = [g.token_ids for g in generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=4, device="cpu")]
    assert _as_generate(tokenizer, decoder.decode(prompts, 3)) == want
    assert _as_generate(tokenizer, decoder.decode(prompts[:1], 1)) == [want[0][:1]]


def test_decoding_stops_when_every_row_has_ended(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] += 1.0
    prompts = _prompts(tokenizer, 3)
    decoder = _decoder(model, tokenizer, rows=3, slots=max(map(len, prompts)) + 100, new=100)
    steps = []
    real = decoder._run_step
    decoder._run_step = lambda length: steps.append(length) or real(length)
    assert decoder.decode(prompts, 100) == [[tokenizer.eos_token_id]] * 3
    assert len(steps) < decoding._CHECK_EVERY


def test_a_batch_that_does_not_fit_is_refused(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompts = _prompts(tokenizer, 3)
    decoder = _decoder(model, tokenizer, rows=2, slots=decoding.SLOT_STEP, new=8)
    with pytest.raises(ValueError, match="do not fit a decoder of 2 rows and 256 slots"):
        decoder.decode(prompts, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA card")
def test_cuda_graphs_answer_as_generate(tiny_base, tokenizer, monkeypatch):
    monkeypatch.setattr(decoding, "SLOT_STEP", 16)
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cuda")
    prompts = _prompts(tokenizer)
    want = [g.token_ids for g in generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=1, device="cuda")]
    decoder = _decoder(model, tokenizer, rows=5, slots=max(map(len, prompts)) + 48, new=48)
    got = _as_generate(tokenizer, decoder.decode(prompts[:5], 48) + decoder.decode(prompts[5:], 48))
    assert decoder.graphs and got == want


def test_a_shared_beginning_is_computed_once_and_answers_as_generate(tuned_adapter, tiny_base, tokenizer,
                                                                      monkeypatch):
    """Prompts behind one few-shot block (the leaderboard tasks' shape): the block is prefilled in
    one row and copied to every row, and the answers are generate's, batch after batch."""
    from sabia_ift.evaluation.generation import inference_copy

    monkeypatch.setattr(decoding, "SLOT_STEP", 8)
    monkeypatch.setattr(decoding, "MIN_SHARED", 16)
    _, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    plain = inference_copy(model, merge=True)
    own = _prompts(tokenizer, 7)
    block = [t for p in own[:2] for t in p[1:]][:40]  # a "few-shot block": earlier prompts' tokens, no BOS
    prompts = [[p[0], *block, *p[1:]] for p in own]
    # Two alike to the last token: the shared part stops one short, so each row still has its own.
    prompts.append(list(prompts[0]))
    want = [g.token_ids for g in generate(plain, tokenizer, prompts, max_new_tokens=12, batch_size=1, device="cpu")]
    decoder = _decoder(plain, tokenizer, rows=5, slots=max(map(len, prompts)) + 12, new=12)
    passes = []
    real = decoder._forward
    decoder._forward = lambda ids, *rest: passes.append(tuple(ids.shape)) or real(ids, *rest)
    got = _as_generate(tokenizer, decoder.decode(prompts[:5], 12) + decoder.decode(prompts[5:], 12))
    assert got == want
    assert got[-1] == got[0]
    widths = [max(map(len, prompts[:5])), max(map(len, prompts[5:]))]
    # The block, BOS and the template's own first words after it.
    shared = [decoding.shared_prefix(prompts[:5]), decoding.shared_prefix(prompts[5:])]
    assert min(shared) > 41
    # Each batch: one pass of one row over what its prompts share, then every row over its own rest.
    assert passes == [(1, shared[0]), (5, widths[0] - shared[0]), *[(5, 1)] * 11,
                      (1, shared[1]), (5, widths[1] - shared[1]), *[(5, 1)] * 11]
    assert decoder.prompt_tokens == sum(map(len, prompts))
    assert decoder.prefill_tokens == sum(s + 5 * (w - s) for s, w in zip(shared, widths))


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert decoding.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert decoding.shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert decoding.shared_prefix([[1, 2, 3], [1, 2]]) == 1
    assert decoding.shared_prefix([[7, 2], [1, 2]]) == 0
    assert decoding.shared_prefix([[1]]) == 0
