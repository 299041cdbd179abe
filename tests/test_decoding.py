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


def _decoder(model, tokenizer, rows, slots, new, attention="auto"):
    return decoding.GreedyDecoder(model, rows=rows, slots=slots, max_new_tokens=new, attention=attention,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def _count_row_reads(monkeypatch):
    calls = []
    real = decoding.RowReads.__call__
    monkeypatch.setattr(decoding.RowReads, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _as_generate(tokenizer, answers):
    """generate's token ids (EOS left out) from the decoder's (EOS kept)."""
    eos = tokenizer.eos_token_id
    return [tuple(a[:-1]) if a and a[-1] == eos else tuple(a) for a in answers]


@pytest.mark.parametrize("attention", ["mask", "rows"])
def test_batches_answer_as_generate_across_cache_lengths(tuned_adapter, tiny_base, tokenizer, monkeypatch,
                                                         attention):
    """Two batches through one decoder, padding rows beside the prompts, and attention reading
    the cache through several lengths (a small SLOT_STEP), or each row its own length, give
    generate's answers."""
    from sabia_ift.evaluation.generation import inference_copy

    monkeypatch.setattr(decoding, "SLOT_STEP", 8)
    reads = _count_row_reads(monkeypatch)
    _, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    prompts = _prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 3
    lengths = []
    for plain in (inference_copy(model, merge=False), inference_copy(model, merge=True)):
        want = [g.token_ids for g in generate(plain, tokenizer, prompts, max_new_tokens=40, batch_size=1,
                                              device="cpu")]
        decoder = _decoder(plain, tokenizer, rows=6, slots=max(map(len, prompts)) + 40, new=40, attention=attention)
        got = _as_generate(tokenizer, decoder.decode(prompts[:6], 40) + decoder.decode(prompts[6:], 40))
        assert got == want
        assert plain.config._attn_implementation == "sdpa"
        lengths.append({len(w) for w in want})
    assert lengths[0] == {40} and max(lengths[1]) < 40  # the base runs on through 6 lengths; the tuned stops
    # Every decoding step of every layer went through the row reads (and none did under "mask").
    layers = model.config.num_hidden_layers
    assert (len(reads) >= layers * 39 * 2 and len(reads) % layers == 0) if attention == "rows" else not reads


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


@pytest.mark.parametrize("attention", ["mask", "rows"])
def test_a_shared_beginning_is_computed_once_and_answers_as_generate(tuned_adapter, tiny_base, tokenizer,
                                                                      monkeypatch, attention):
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
    decoder = _decoder(plain, tokenizer, rows=5, slots=max(map(len, prompts)) + 12, new=12, attention=attention)
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


def test_row_reads_read_each_rows_own_slots_and_nothing_past_them():
    """What a decoding step reads with row reads: each row its first `used` slots. Garbage past
    them (another answer's leftovers, padding) changes nothing."""
    torch.manual_seed(0)
    rows, heads, size, dim = 3, 2, 8, 4
    query = torch.randn(rows, heads, 1, dim)
    keys, values = torch.randn(rows, heads, size, dim), torch.randn(rows, heads, size, dim)
    reads = decoding.RowReads(rows, size, "cpu", flash=False)
    reads.used.copy_(torch.tensor([8, 3, 1]))
    got, _ = reads(query, keys, values, 0.5)
    for row, used in enumerate([8, 3, 1]):
        want = torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1], keys[row:row + 1, :, :used], values[row:row + 1, :, :used], scale=0.5)
        torch.testing.assert_close(got[row:row + 1], want.transpose(1, 2))
    keys[1, :, 3:] = values[1, :, 3:] = 1e4
    torch.testing.assert_close(reads(query, keys, values, 0.5)[0], got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's kernel needs a CUDA card")
def test_flash_row_reads_match_the_masked_read_on_the_card():
    torch.manual_seed(0)
    rows, heads, size, dim = 5, 4, 512, 128
    query = torch.randn(rows, 1, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    store = [torch.randn(rows, size, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    keys, values = (s.transpose(1, 2) for s in store)
    used = torch.tensor([512, 300, 1, 77, 256], device="cuda", dtype=torch.int32)
    flash, masked = (decoding.RowReads(rows, size, "cuda", flash=f) for f in (True, False))
    flash.used.copy_(used)
    masked.used.copy_(used)
    torch.testing.assert_close(flash(query, keys, values, dim ** -0.5)[0], masked(query, keys, values, dim ** -0.5)[0],
                               atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA card")
def test_row_reads_in_bf16_on_the_card_answer_as_the_masked_read(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.bfloat16, device="cuda")
    prompts = _prompts(tokenizer)
    assert decoding.pick_attention(model) == "rows"
    answers = {}
    for attention in ("rows", "mask"):
        decoder = _decoder(model, tokenizer, rows=5, slots=max(map(len, prompts)) + 48, new=48, attention=attention)
        answers[attention] = decoder.decode(prompts[:5], 48) + decoder.decode(prompts[5:], 48)
        # Row reads replay one graph for every step; the mask read one a cache length.
        assert decoder.graphs and (attention == "mask" or len(decoder.graphs) == 1)
    # bf16 kernels of other shapes can part near-tied logits; the first tokens agree.
    assert [a[:4] for a in answers["rows"]] == [a[:4] for a in answers["mask"]]


def test_fused_kernels_are_chosen_only_on_the_card(tiny_base):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.bfloat16, device="cpu")
    assert model.config.model_type == "llama"
    assert not decoding.pick_fused(model) and decoding.pick_attention(model) == "mask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need a CUDA card")
def test_fused_norms_and_rotary_compute_what_transformers_does_and_are_put_back(tiny_base, tokenizer):
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.bfloat16, device="cuda")
    assert decoding.pick_fused(model)
    prompts = _prompts(tokenizer)
    own_rope, norm = modeling_llama.apply_rotary_pos_emb, model.model.norm
    x = torch.randn(3, 7, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    want = norm(x)
    with decoding.fused_small_kernels(model):
        assert modeling_llama.apply_rotary_pos_emb is not own_rope and "forward" in vars(norm)
        torch.testing.assert_close(norm(x), want, atol=1e-2, rtol=1e-2)
    assert modeling_llama.apply_rotary_pos_emb is own_rope and "forward" not in vars(norm)
    answers = {}
    for fused in (True, False):
        decoder = _decoder(model, tokenizer, rows=5, slots=max(map(len, prompts)) + 48, new=48, attention="rows")
        decoder.fused = fused
        answers[fused] = decoder.decode(prompts[:5], 48) + decoder.decode(prompts[5:], 48)
    assert modeling_llama.apply_rotary_pos_emb is own_rope
    # bf16 kernels of other reduction orders can part near-tied logits; the first tokens agree.
    assert [a[:4] for a in answers[True]] == [a[:4] for a in answers[False]]


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert decoding.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert decoding.shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert decoding.shared_prefix([[1, 2, 3], [1, 2]]) == 1
    assert decoding.shared_prefix([[7, 2], [1, 2]]) == 0
    assert decoding.shared_prefix([[1]]) == 0
