"""Batched left-padded greedy generation gives what one-at-a-time generation gives."""

import contextlib

import pytest
import torch

from sabia_ift.evaluation.generation import generate
from sabia_ift.modeling import load_model
from sabia_ift.template import build_prompt, encode_prompt


def test_batching_and_left_padding_do_not_change_outputs(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompts = [encode_prompt(tokenizer, build_prompt(q)) for q in
               ("Quanto é 2 mais 2?", "Escreva por extenso o número trezentos e quarenta e dois, por favor.", "Oi")]
    assert len({len(p) for p in prompts}) == 3  # different lengths, so the batch is padded
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, device="cpu")
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1, device="cpu")[0] for p in prompts]
    assert batched == single


def test_stop_detection(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    # Make the model say EOS at once by rigging its output layer.
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] += 1.0
    out = generate(model, tokenizer, [encode_prompt(tokenizer, build_prompt("Pare."))],
                   max_new_tokens=8, batch_size=1, device="cpu")[0]
    assert out.stopped and out.new_tokens == 1 and out.text == ""
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[500] += 1.0  # an ordinary word piece, forever
    out = generate(model, tokenizer, [encode_prompt(tokenizer, build_prompt("Continue."))],
                   max_new_tokens=8, batch_size=1, device="cpu")[0]
    assert not out.stopped and out.new_tokens == 8


def test_answers_never_run_past_the_context(tiny_base, tokenizer):
    from sabia_ift.errors import ModelError

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompt = encode_prompt(tokenizer, build_prompt("Conte uma história longa."))
    context = len(prompt) + 5
    out = generate(model, tokenizer, [prompt], max_new_tokens=40, batch_size=1, device="cpu", context_length=context)
    assert out[0].new_tokens <= 5
    with pytest.raises(ModelError, match=f"a prompt of {len(prompt)} tokens leaves no room"):
        generate(model, tokenizer, [prompt], max_new_tokens=4, batch_size=1, device="cpu",
                 context_length=len(prompt))


def _test_prompts(tokenizer):
    from sabia_ift.toy.sample import generate_rows

    rows = generate_rows(1)[:12]
    return [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input", ""))) for r in rows]


def test_fast_engine_answers_as_hf_generate(tuned_adapter, tiny_base, tokenizer):
    """Sorting, batches cut apart, a plain copy and merged weights change no greedy answer."""
    from sabia_ift.evaluation.generation import adapter_enabled, fast_generate, inference_copy
    from sabia_ift.modeling import load_tuned

    _, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    prompts = _test_prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 1
    answers = {}
    for tuned in (False, True):
        with model.disable_adapter() if not tuned else contextlib.nullcontext():
            assert adapter_enabled(model) is tuned
            plain = inference_copy(model, merge=tuned)
            assert not any("lora" in name for name, _ in plain.named_parameters())
            want = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4, device="cpu")
            got = fast_generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=3, plain=plain)
            wide = fast_generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=5, plain=plain)
        assert got == want and wide == want
        answers[tuned] = got
    assert answers[True] != answers[False]  # the merged adapter is really in the copy


def test_fast_engine_halves_the_batch_on_out_of_memory(tuned_adapter, tiny_base, tokenizer, caplog, monkeypatch):
    from sabia_ift.evaluation import decoding
    from sabia_ift.evaluation.generation import fast_generate, inference_copy
    from sabia_ift.modeling import load_tuned

    _, model = load_tuned(tiny_base, tuned_adapter, "cpu")
    plain = inference_copy(model, merge=True)
    prompts = _test_prompts(tokenizer)
    want = fast_generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=8, plain=plain)
    real, rows = decoding.GreedyDecoder.decode, []

    def tight(self, batch, new_tokens):
        rows.append(self.rows)
        if self.rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, new_tokens)

    monkeypatch.setattr(decoding.GreedyDecoder, "decode", tight)
    with caplog.at_level("INFO"):
        got = fast_generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=8, plain=plain)
    assert got == want and rows[:3] == [8, 4, 2] and set(rows[3:]) == {2} and len(rows) == 2 + len(prompts) // 2
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1
    # The call's summary counts what was answered, the halving included.
    summary = [r.getMessage() for r in caplog.records if "new tokens in" in r.getMessage()]
    assert len(summary) == 1
    assert summary[0].startswith(f"generation: {len(prompts)} prompts, {sum(g.new_tokens for g in got)} new tokens in ")


def test_batch_size_follows_free_memory():
    """The KV cache of a 7B (32 layers, 32 heads of 128, bf16) is 0.5 MiB a token."""
    from types import SimpleNamespace

    from sabia_ift.evaluation.generation import rows_that_fit

    config = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             hidden_size=4096, intermediate_size=11008, head_dim=None)
    weight = torch.empty(1, dtype=torch.bfloat16)
    plain = SimpleNamespace(config=config, get_input_embeddings=lambda: SimpleNamespace(weight=weight))
    per_row = 2**19 * (300 + 212) + 3 * 300 * 11008 * 2
    assert rows_that_fit(plain, 300, 212, 40 * 2**30) == int(40 * 2**30 * 0.7) // per_row
    assert rows_that_fit(plain, 300, 212, 10 * 2**30) < rows_that_fit(plain, 300, 212, 40 * 2**30)
    assert rows_that_fit(plain, 300, 212, 2**20) == 1


def test_prompts_near_the_context_get_the_room_left(tiny_base, tokenizer):
    from sabia_ift.evaluation.generation import fast_generate

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompts = _test_prompts(tokenizer)[:4]
    context = max(map(len, prompts)) + 3
    out = fast_generate(model, tokenizer, prompts, max_new_tokens=20, context_length=context, plain=model)
    assert all(g.stopped or g.new_tokens == min(20, context - len(p)) for g, p in zip(out, prompts, strict=True))


@pytest.mark.parametrize("engine", ["auto", "hf", "fast"])
def test_the_engine_named_or_picked_answers_and_is_reported(tiny_base, tokenizer, engine):
    """evaluate.engine: auto takes the 4-bit-capable HF path off CUDA; a named engine is used as named,
    and both give the same greedy answers on the same weights."""
    from sabia_ift.evaluation.generation import _copies, generate_with

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    prompts = _test_prompts(tokenizer)[:5]
    want = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=5, device="cpu")
    got, used = generate_with(engine, model, tokenizer, prompts, max_new_tokens=16, batch_size=2, device="cpu")
    assert used == ("hf" if engine == "auto" else engine)
    assert got == want
    assert not _copies  # the fast engine's copy is not kept beside the next model
