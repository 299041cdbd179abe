"""Greedy decoding into a KV cache of fixed size; on CUDA each decoding step is one CUDA graph replay.

A 7B decoding step at batch 64 reads about 14 GB of weights: roughly 4 ms on an H100, while
launching its few thousand kernels one by one from Python takes several times that. A CUDA
graph replays them in one launch. transformers can compile its own static cache, but its
`generate` builds a new cache on every call, and graphs recorded against one cache's addresses
are recorded again for the next batch (138-204 new tokens/s on an H100, slower than eager:
BENCHMARKS.md). Here the cache, the step's inputs and the graphs belong to one `GreedyDecoder`
that answers every batch of an evaluation.

Prompts that begin alike (the leaderboard tasks' few-shot block, thousands of tokens before
each question, the same for every question) have that common beginning computed once a
batch, in one row, and its keys and values copied to every row of the cache: the prefill
then runs over the rest of each prompt only.
"""

from __future__ import annotations

from typing import Any

# Attention reads the cache up to a multiple of this many slots: each multiple has a graph of its
# own, so a step never reads much more of the cache than its rows have written.
SLOT_STEP = 256
# Steps between checks whether every row has ended with EOS (each check waits for the card).
_CHECK_EVERY = 16
# A shared beginning shorter than this is prefilled with the rest: a pass of its own costs more
# than it saves (the Alpaca template's first line is about 30 tokens).
MIN_SHARED = 64


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one of its own
    (the prefill's last position gives a row its first answer token)."""
    first, shortest = prompts[0], min(map(len, prompts))
    for i in range(shortest - 1):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(shortest - 1, 0)


def round_slots(tokens: int) -> int:
    return -(-tokens // SLOT_STEP) * SLOT_STEP


class SlotCache:
    """What a transformers decoder layer asks of its cache (`update`): keys and values written
    at `slots`, the same for every row (prompts are left-padded to one width), and read back
    as the first `length` slots, which the caller's attention mask covers. A pass of one row
    (a shared prompt beginning) writes its keys and values into every row and reads its own."""

    def __init__(self, size: int, rows: int) -> None:
        self.keys: dict[int, Any] = {}
        self.values: dict[int, Any] = {}
        self.slots: Any = None
        self.length = 0
        self.size, self.rows = size, rows

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        import torch

        if layer_idx not in self.keys:
            # The first prefill allocates; every later write lands in the same tensors, which
            # the captured graphs read and write.
            _, heads, _, dim = key_states.shape
            self.keys[layer_idx] = torch.zeros((self.rows, heads, self.size, dim), dtype=key_states.dtype,
                                               device=key_states.device)
            self.values[layer_idx] = torch.zeros((self.rows, value_states.shape[1], self.size, value_states.shape[3]),
                                                 dtype=value_states.dtype, device=value_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = key_states.shape[0]
        keys.index_copy_(2, self.slots, key_states.expand(self.rows, -1, -1, -1))
        values.index_copy_(2, self.slots, value_states.expand(self.rows, -1, -1, -1))
        return keys[:rows, :, : self.length], values[:rows, :, : self.length]


class GreedyDecoder:
    """Answers batches of at most `rows` prompts whose prompt and answer fit `slots` tokens,
    greedily, as transformers' `generate` does for left-padded prompts (its position ids, its
    first-argmax tie rule). Rows past a batch's prompts are padding that attends to itself."""

    def __init__(self, model, *, rows: int, slots: int, max_new_tokens: int, pad_token_id: int,
                 eos_token_id: int | None) -> None:
        import torch

        self.model, self.rows, self.slots = model, rows, round_slots(slots)
        self.pad, self.eos = pad_token_id, eos_token_id
        device = model.get_input_embeddings().weight.device
        self.device = device
        self.graphed = device.type == "cuda"
        self.cache = SlotCache(self.slots, rows)
        long = dict(dtype=torch.long, device=device)
        # The decoding step's inputs and outputs: fixed tensors the graphs read and write in place.
        self.tokens = torch.full((rows, 1), pad_token_id, **long)
        self.positions = torch.zeros((rows, 1), **long)
        self.slot = torch.zeros(1, **long)
        self.written = torch.zeros(1, **long)
        self.keymask = torch.zeros((rows, 1, 1, self.slots), dtype=torch.bool, device=device)
        self.answers = torch.full((rows, max_new_tokens), pad_token_id, **long)
        self.graphs: dict[int, Any] = {}
        # Prompt tokens given, and token positions the prefill computed (padding rows and columns
        # included, a shared beginning once): what sharing saves, for the log and the benchmarks.
        self.prompt_tokens = self.prefill_tokens = 0

    def _forward(self, input_ids, mask, positions, length: int):
        self.cache.length = length
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    def _step(self, length: int) -> None:
        # The new token's own slot opens before attention reads it.
        self.keymask.index_fill_(3, self.slot, True)
        self.cache.slots = self.slot
        chosen = self._forward(self.tokens, self.keymask[..., :length], self.positions, length)
        self.answers.index_copy_(1, self.written, chosen[:, None])
        self.tokens.copy_(chosen[:, None])
        self.positions.add_(1)
        self.slot.add_(1)
        self.written.add_(1)

    def _run_step(self, length: int) -> None:
        if not self.graphed:
            self._step(length)
            return
        import torch

        graph = self.graphs.get(length)
        if graph is not None:
            graph.replay()
            return
        # The first step of each length runs eagerly on a side stream (it warms up the kernels
        # the capture records), then is captured; capturing runs nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(length)
        self.graphs[length] = graph

    def decode(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's answer token ids, cut after its first EOS (kept), at most `max_new_tokens`."""
        import torch

        width = max(map(len, prompts))
        if len(prompts) > self.rows or width + max_new_tokens > self.slots or max_new_tokens > self.answers.shape[1]:
            raise ValueError(f"{len(prompts)} prompts of up to {width} tokens and {max_new_tokens} new tokens "
                             f"do not fit a decoder of {self.rows} rows and {self.slots} slots")
        shared = shared_prefix(prompts) if len(prompts) > 1 else 0
        shared = shared if shared >= MIN_SHARED else 0
        # The shared beginning first, then each prompt's own rest, left-padded: every row's
        # tokens still sit in order, and its positions count them as if it were alone.
        width = shared + max(len(p) - shared for p in prompts)
        ids = torch.full((self.rows, width), self.pad, dtype=torch.long)
        real = torch.zeros((self.rows, width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, :shared] = torch.tensor(prompt[:shared])
            ids[row, width - len(prompt) + shared:] = torch.tensor(prompt[shared:])
            real[row, :shared] = True
            real[row, width - len(prompt) + shared:] = True
        ids, real = ids.to(self.device), real.to(self.device)
        # transformers' positions for left padding: each row counts its own tokens from 0.
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        itself = torch.eye(width, dtype=torch.bool, device=self.device)
        # A padding query sees only itself: a row with nothing to attend to would give NaN.
        mask = (causal & real[:, None, :]) | itself
        self.prompt_tokens += sum(map(len, prompts))
        self.prefill_tokens += shared + self.rows * (width - shared)
        with torch.no_grad():
            if shared:
                # One row computes the shared beginning; the cache copies it to every row.
                self.cache.slots = torch.arange(shared, device=self.device)
                self._forward(ids[:1, :shared], mask[:1, None, :shared, :shared], positions[:1, :shared], shared)
            self.cache.slots = torch.arange(shared, width, device=self.device)
            first = self._forward(ids[:, shared:], mask[:, None, shared:], positions[:, shared:], width)
            self.answers[:, 0] = first
            self.tokens[:, 0] = first
            self.positions[:, 0] = real.sum(-1)
            self.slot.fill_(width)
            self.written.fill_(1)
            self.keymask.zero_()
            self.keymask[:, 0, 0, :width] = real
            steps = 1
            while steps < max_new_tokens:
                if (self.eos is not None and steps % _CHECK_EVERY == 0
                        and self._all_ended(len(prompts), steps, self.eos)):
                    break
                # This step writes slot width + steps - 1, so attention reads width + steps slots.
                self._run_step(round_slots(width + steps))
                steps += 1
        answers = self.answers[: len(prompts), :steps].tolist()
        return [a[: a.index(self.eos) + 1] if self.eos in a else a for a in answers]

    def _all_ended(self, count: int, steps: int, eos: int) -> bool:
        import torch

        return bool(torch.eq(self.answers[:count, :steps], eos).any(-1).all())
