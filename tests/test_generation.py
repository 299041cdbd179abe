"""Batched left-padded greedy generation gives what one-at-a-time generation gives."""

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
