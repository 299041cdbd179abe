"""Packed micro-batches compute exactly what the rows alone compute; the sampler loses and repeats nothing."""

import random
from collections import Counter

import pytest
import torch

from sabia_ift.modeling import load_model
from sabia_ift.template import IGNORE_INDEX, build_prompt, encode_prompt
from sabia_ift.train.packing import (
    CountingCollator,
    RowBatchSampler,
    pack_rows,
    split_to_multiple,
    trade_equal_lengths,
)


def test_pack_rows_places_every_row_once_within_the_budget():
    lengths = [7, 300, 120, 90, 5, 250, 64, 64, 1000, 33]
    bins = pack_rows(lengths, 320)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 320 for b in bins if len(b) > 1)
    assert [8] in bins  # longer than the budget: a bin of its own
    assert pack_rows(lengths, 320) == bins  # deterministic
    # Best fit: no bin could take another bin's smallest row.
    assert len(bins) <= 6


def test_trading_equal_lengths_keeps_each_bins_tokens_and_changes_company():
    lengths = [(i * 13) % 9 + 3 for i in range(60)]  # many rows of each length
    bins = pack_rows(lengths, 40)
    traded = trade_equal_lengths(bins, lengths, random.Random(1))
    assert sorted(i for b in traded for i in b) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in b) for b in traded] == [sorted(lengths[i] for i in b) for b in bins]
    assert traded != bins
    assert trade_equal_lengths(bins, lengths, random.Random(1)) == traded  # deterministic per seed


def test_packed_bins_regroup_each_epoch_with_the_same_step_count():
    lengths = [(i * 37) % 200 + 5 for i in range(103)] * 2
    sampler = RowBatchSampler(lengths, packing=True, micro_batch_size=4, micro_batch_tokens=256, by_length=True,
                              seed=3, per_step=2)
    epochs = [sampler.batches(e) for e in (0, 1)]
    assert len(epochs[0]) == len(epochs[1])
    assert sorted(sum(lengths[i] for i in b) for b in epochs[0]) == \
        sorted(sum(lengths[i] for i in b) for b in epochs[1])
    assert {tuple(b) for b in epochs[0]} != {tuple(b) for b in epochs[1]}  # new company, not only a new order


def test_split_to_multiple_keeps_every_row():
    batches = [[0, 1, 2], [3], [4, 5]]
    out = split_to_multiple(batches, 4, [10] * 6)
    assert len(out) == 4 and sorted(i for b in out for i in b) == list(range(6))


@pytest.mark.parametrize("packing", [False, True])
def test_processes_share_an_epoch_without_losing_or_repeating_rows(packing):
    lengths = [(i * 37) % 200 + 5 for i in range(103)]
    common = dict(packing=packing, micro_batch_size=4, micro_batch_tokens=256, by_length=True, seed=3, per_step=2)
    ranks = [RowBatchSampler(lengths, world_size=2, rank=r, **common) for r in (0, 1)]
    alone = RowBatchSampler(lengths, **common)
    for epoch in (0, 1):
        for s in (*ranks, alone):
            s.set_epoch(epoch)
        shares = [list(s) for s in ranks]
        assert len(shares[0]) == len(shares[1]) == len(ranks[0])
        seen = Counter(i for share in shares for batch in share for i in batch)
        assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}
        # Step k of two processes holds the same rows as step k of one process accumulating two.
        single = list(alone)
        assert [sorted(shares[0][k] + shares[1][k]) for k in range(len(shares[0]))] == \
            [sorted(single[2 * k] + single[2 * k + 1]) for k in range(len(single) // 2)]
    epoch1 = list(ranks[0])
    ranks[0].set_epoch(0)
    assert list(ranks[0]) != epoch1  # a new order each epoch


def _rows(tokenizer, texts):
    rows = []
    for instruction, response in texts:
        prompt = encode_prompt(tokenizer, build_prompt(instruction))
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


def test_packed_rows_give_the_logits_and_losses_of_each_row_alone(tiny_base, tokenizer):
    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    model.eval()
    rows = _rows(tokenizer, [("Quanto é 2 + 2?", "4."), ("Diga o nome de uma cor.", "Azul, como o céu."),
                             ("Escreva uma frase longa sobre o mar.", "O mar é grande, azul e cheio de vida.")])
    packed = CountingCollator(tokenizer, packing=True, varlen=False, pad_to_multiple_of=None)
    padded = CountingCollator(tokenizer, packing=False, varlen=False, pad_to_multiple_of=None)
    batch = packed(rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and "attention_mask" not in batch
    with torch.no_grad():
        out = model(**batch, use_cache=False)  # as in training: no cache
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False)
            end = start + len(row["input_ids"])
            # Every position, the first (BOS) and the last (EOS) included.
            torch.testing.assert_close(out.logits[0, start:end], alone.logits[0], rtol=1e-5, atol=1e-5)
            start = end
        # The packed loss is the token-weighted mean of the rows' own losses.
        losses, counts = [], []
        for row in rows:
            labels = torch.tensor([row["labels"]])
            res = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels, use_cache=False)
            losses.append(res.loss * (labels[0, 1:] != IGNORE_INDEX).sum())
            counts.append((labels[0, 1:] != IGNORE_INDEX).sum())
        torch.testing.assert_close(out.loss, sum(losses) / sum(counts), rtol=1e-5, atol=1e-6)
    padded(rows)
    assert packed.trained_tokens == padded.trained_tokens == sum(
        sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows)
    assert packed.input_tokens == padded.input_tokens
