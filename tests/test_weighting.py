"""Row weighting: every row the same share of the gradient over the run, whatever the batch layout."""

import pytest
import torch

from conftest import peft_model
from sabia_ift.errors import ConfigError
from sabia_ift.modeling import load_model
from sabia_ift.template import IGNORE_INDEX as X
from sabia_ift.train import weighting
from sabia_ift.train.packing import CountingCollator


def test_shares_of_packed_rows_follow_the_restarting_positions():
    batch = {"labels": torch.tensor([[X, 5, 6, X, X, 7]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    shares, tokens = weighting.row_shares(batch)
    # Position t predicts label t + 1: row one trains two tokens, row two one.
    assert shares.tolist() == [[0.5, 0.5, 0.0, 0.0, 1.0, 0.0]]
    assert tokens == 3


def test_shares_of_padded_rows_follow_the_batch_rows():
    batch = {"labels": torch.tensor([[X, 5, 6, 7], [X, X, 8, X]])}
    shares, tokens = weighting.row_shares(batch)
    torch.testing.assert_close(shares, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    assert tokens == 4


def test_step_weights_scale_shares_by_the_step_tokens_over_the_run_rows_per_step():
    first = {"labels": torch.tensor([[X, 5, 6, 7]])}
    second = {"labels": torch.tensor([[X, 8, X, X]])}
    weighting.weigh_step([first, second], rows_per_step=2.0)
    # 4 trained tokens, 2 rows a step on average: each row's weights add up to 4 / 2.
    torch.testing.assert_close(first[weighting.KEY], torch.tensor([[2 / 3, 2 / 3, 2 / 3, 0.0]]))
    torch.testing.assert_close(second[weighting.KEY], torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    gathered = []
    weighting.weigh_step([first], rows_per_step=4.0,
                         gather=lambda tokens: gathered.append(tokens.tolist()) or tokens * 2)
    assert gathered == [[3.0]]
    torch.testing.assert_close(first[weighting.KEY], torch.tensor([[0.5, 0.5, 0.5, 0.0]]))


def test_rows_per_step_counts_every_process_micro_batches():
    # 96 rows in 24 micro-batches a epoch, 4 a step: 6 steps of 16 rows on average.
    assert weighting.rows_per_step(96, 24, 4) == 16.0


def _rows(vocab):
    g = torch.Generator().manual_seed(3)
    rows = []
    for prompt, answer in ((5, 3), (4, 11), (7, 1), (3, 6)):
        ids = torch.randint(3, vocab, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    return rows


def _model(tiny_base):
    base = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    model = peft_model(base, ["q_proj", "v_proj", "down_proj"], 4, b_std=0.05)
    model.config.use_cache = False  # as in training: a cache would hide the packed rows' boundaries
    model.train()
    return model


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def _row_mean_reference(model, rows, rows_per_step):
    """Each row alone: the mean of its trained tokens' losses; summed over rows, over the rows a step."""
    losses = []
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=X))
    (torch.stack(losses).sum() / rows_per_step).backward()
    return _grads(model)


def _weighted_step(model, micro_batches, weigh=True, rows_per_step=4.0):
    """What the Trainer does with a step's micro-batches: summed token losses over the step's tokens."""
    holder = weighting.RowWeighting(rows_per_step)
    holder.attach(model.get_base_model().model)
    if weigh:
        weighting.weigh_step(micro_batches, rows_per_step)
    tokens = sum(int((b["labels"][:, 1:] != X).sum()) for b in micro_batches)
    for batch in micro_batches:
        inputs = dict(batch)
        holder.weights = inputs.pop(weighting.KEY, None)
        model(**inputs, num_items_in_batch=tokens).loss.backward()
        holder.weights = None  # as the Trainer's compute_loss leaves it
    return _grads(model)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("rows_per_step", [4.0, 6.5])
def test_weighted_step_gradient_is_the_sum_of_row_means_over_rows_a_step(tiny_base, tokenizer, packing,
                                                                           rows_per_step):
    model = _model(tiny_base)
    rows = _rows(model.config.vocab_size)
    expected = _row_mean_reference(model, rows, rows_per_step)
    collate = CountingCollator(tokenizer, packing=packing, varlen=False, pad_to_multiple_of=None)
    # Two micro-batches in one optimizer step, rows of different lengths in each.
    got = _weighted_step(model, [collate(rows[:2]), collate(rows[2:])], rows_per_step=rows_per_step)
    plain = _weighted_step(model, [collate(rows[:2]), collate(rows[2:])], weigh=False)
    assert expected.keys() == got.keys() and len(got) == 2 * 3 * model.config.num_hidden_layers
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # The token mean weighs the 11-token answer more: a different gradient.
    assert any(not torch.allclose(plain[n], expected[n], rtol=1e-2, atol=1e-6) for n in expected)


def test_evaluation_and_unweighted_forwards_are_untouched(tiny_base):
    model = _model(tiny_base)
    holder = weighting.RowWeighting(rows_per_step=8.0)
    holder.attach(model.get_base_model().model)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    reference = model(input_ids=ids, labels=ids).loss
    holder.weights = torch.full((1, 12), 3.0)
    # The loss value is the token mean either way; only its gradient is weighted.
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, reference)
    holder.weights = torch.ones((1, 5))
    with pytest.raises(RuntimeError, match=r"row weights of shape \(1, 5\) for hidden states of shape \(1, 12"):
        model(input_ids=ids, labels=ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)  # eval ignores a left-over weight


def test_training_the_output_projection_is_refused():
    with pytest.raises(ConfigError, match="train.loss_weighting: rows weighs the gradient below the output"):
        weighting.check_targets("rows", ["q_proj", "lm_head"])
    weighting.check_targets("tokens", ["q_proj", "lm_head"])
