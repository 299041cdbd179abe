"""Micro-batches without padding: which rows go together, and how they are laid out.

Two layouts share one batch sampler:

- padded (`train.packing: false`): `micro_batch_size` rows per micro-batch,
  padded to the longest; length grouping keeps the padding small.
- packed (`train.packing: true`): rows are concatenated into one sequence of at
  most `micro_batch_tokens` tokens. Positions restart at every row and the
  attention never crosses a row boundary (a varlen flash kernel on CUDA, a
  block-diagonal mask elsewhere), so each row is computed exactly as if alone,
  and no compute is spent on padding.

Packed bins keep their token counts for the run, but rows of equal length trade
bins every epoch, so a row meets other rows, as in padded batches formed anew.

The sampler is rank-aware: every process builds the same batches from the same
seed and takes every world_size-th. The number of batches is made a multiple
of the micro-batches in one optimizer step (all processes together) by
splitting batches, never by dropping or repeating rows; so 1 process
accumulating N micro-batches and N processes taking one each see exactly the
same optimizer steps.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from ..template import IGNORE_INDEX


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing: rows into as few bins of at most `budget` tokens as it can.

    Deterministic for given lengths, so every process (and a resumed run) gets
    the same bins. A row longer than the budget gets a bin of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Free space of each bin, kept sorted with the bin's index for best-fit lookup.
    free: list[tuple[int, int]] = []
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (max(budget - need, 0), len(bins) - 1))
    return [sorted(b) for b in bins]


def group_rows(lengths: list[int], size: int, seed: int, by_length: bool) -> list[list[int]]:
    """Fixed-size batches of rows: shuffled, then (optionally) sorted by length within
    windows of 50 batches so each batch pads to a similar length; batch order shuffled."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if by_length:
        window = size * 50
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: (-lengths[i], i))]
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    if by_length:
        rng.shuffle(batches)
    return batches


def split_to_multiple(batches: list[list[int]], multiple: int, lengths: list[int]) -> list[list[int]]:
    """Split the largest batches in two until their number is a multiple of `multiple`.

    Every optimizer step gets its full number of micro-batches, so every
    process runs as many as the others (DDP all-reduces each step), and no row
    is lost or seen twice.
    """
    batches = [list(b) for b in batches]
    while len(batches) % multiple:
        splittable = [i for i, b in enumerate(batches) if len(b) > 1]
        if not splittable:
            raise ConfigError(f"train.grad_accum: {sum(map(len, batches))} rows cannot fill {multiple} "
                              "micro-batches a step; "
                             "lower train.grad_accum or use more data")
        big = max(splittable, key=lambda i: (sum(lengths[j] for j in batches[i]), -i))
        rows = batches.pop(big)
        half = len(rows) // 2
        batches[big:big] = [rows[:half], rows[half:]]
    return batches


def trade_equal_lengths(bins: list[list[int]], lengths: list[int], rng: random.Random) -> list[list[int]]:
    """The same bins with rows of equal length shuffled among them.

    Every bin keeps its token count (so its cost and the run's step count), but
    a row meets different rows each epoch, as padded batches regrouped by epoch do.
    """
    slots: dict[int, list[tuple[int, int]]] = {}
    for b, rows in enumerate(bins):
        for k, row in enumerate(rows):
            slots.setdefault(lengths[row], []).append((b, k))
    out = [list(rows) for rows in bins]
    for places in slots.values():
        rows = [bins[b][k] for b, k in places]
        rng.shuffle(rows)
        for (b, k), row in zip(places, rows):
            out[b][k] = row
    return [sorted(rows) for rows in out]


class RowBatchSampler:
    """Yields this process's micro-batches (lists of row indices) for one epoch at a time."""

    def __init__(self, lengths: list[int], *, packing: bool, micro_batch_size: int, micro_batch_tokens: int,
                 by_length: bool, seed: int, per_step: int = 1, world_size: int = 1, rank: int = 0) -> None:
        self.lengths = list(lengths)
        self.packing = packing
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.by_length = by_length
        self.seed = seed
        self.per_step = per_step
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        # The bins' token counts are fixed for the run, so the number of optimizer
        # steps is known up front, as the scheduler needs; which rows fill them and
        # the bins' order change by epoch.
        self._bins = (split_to_multiple(pack_rows(self.lengths, micro_batch_tokens), per_step, self.lengths)
                      if packing else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches for an epoch, in order; this process takes every world_size-th."""
        seed = self.seed + epoch
        if self._bins is not None:
            rng = random.Random(seed)
            bins = trade_equal_lengths(self._bins, self.lengths, rng)
            rng.shuffle(bins)
            return bins
        return split_to_multiple(group_rows(self.lengths, self.micro_batch_size, seed, self.by_length),
                                 self.per_step, self.lengths)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) // self.world_size


class CountingCollator:
    """Builds the micro-batch tensors and counts what training really used: non-pad
    input tokens and trained label tokens.

    Counting here, on CPU tensors, costs no GPU synchronisation; counting in the
    training step would stall the GPU queue every micro-batch.
    """

    def __init__(self, tokenizer, *, packing: bool, varlen: bool, pad_to_multiple_of: int | None) -> None:
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        self.collate: Any
        if packing:
            # Labels already hold IGNORE_INDEX on each row's first token (BOS), so
            # nothing is learned across a row boundary; the separator keeps it so.
            self.collate = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=varlen)
        else:
            self.collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
        self.packing = packing
        self.counting = True
        self.input_tokens = 0
        self.trained_tokens = 0
        self.rows = 0

    def __call__(self, features):
        features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        batch = self.collate(features)
        if self.counting:
            self.rows += len(features)
            self.input_tokens += (int(batch["input_ids"].numel()) if self.packing
                                  else int(batch["attention_mask"].sum()))
            self.trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch
