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

After the prefill each row's tokens are moved to the front of its cache row, so that a row's
cache is its own prompt and answer with nothing between. On CUDA in bf16 or fp16 a decoding
step's attention then reads each row's own length (FlashAttention's variable-length kernel
in PyTorch, `seqused_k`), not the batch's widest prompt plus padding to a graph's length: at
batch 64 over realistic prompts a 7B step on an H100 read 768 slots a row for the 338 its rows
held, and its attention took 8.3 of 17.1 ms; reading each row's own took 5.7 (BENCHMARKS.md).
With Liger's norm and rotary kernels (`fused_small_kernels`) the step took 11.6 ms.
"""

from __future__ import annotations

import contextlib
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
    """What a transformers decoder layer asks of its cache (`update`). In the prefill, keys and
    values are written at `slots`, the same for every row (prompts are left-padded to one
    width); a pass of one row (a shared prompt beginning) writes into every row. In a decoding
    step, with `row_slots` set, each row writes its one new token at a slot of its own. Either
    way the first `length` slots are read back, as (rows, heads, slots, dim) views of a
    (rows, slots, heads, dim) store: the layout the variable-length kernel reads as one
    sequence a row."""

    def __init__(self, size: int, rows: int) -> None:
        self.keys: dict[int, Any] = {}
        self.values: dict[int, Any] = {}
        self.slots: Any = None
        self.row_slots: Any = None
        self.length = 0
        self.size, self.rows = size, rows
        self._row_ids: Any = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        import torch

        if layer_idx not in self.keys:
            # The first prefill allocates; every later write lands in the same tensors, which
            # the captured graphs read and write.
            _, heads, _, dim = key_states.shape
            self.keys[layer_idx] = torch.zeros((self.rows, self.size, heads, dim), dtype=key_states.dtype,
                                               device=key_states.device)
            self.values[layer_idx] = torch.zeros((self.rows, self.size, value_states.shape[1], value_states.shape[3]),
                                                 dtype=value_states.dtype, device=value_states.device)
            self._row_ids = torch.arange(self.rows, device=key_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = key_states.shape[0]
        if self.row_slots is not None:
            keys.index_put_((self._row_ids, self.row_slots), key_states[:, :, 0])
            values.index_put_((self._row_ids, self.row_slots), value_states[:, :, 0])
        else:
            keys.index_copy_(1, self.slots, key_states.transpose(1, 2).expand(self.rows, -1, -1, -1))
            values.index_copy_(1, self.slots, value_states.transpose(1, 2).expand(self.rows, -1, -1, -1))
        return keys[:rows, : self.length].transpose(1, 2), values[:rows, : self.length].transpose(1, 2)

    def move(self, source, target) -> None:
        """In every layer, the tokens at flat positions `source` (row x size + slot) copied to
        `target` (the source is read whole first, so the two may overlap)."""
        for store in (*self.keys.values(), *self.values.values()):
            flat = store.view(-1, *store.shape[2:])
            flat.index_copy_(0, target, flat.index_select(0, source))


# The attention the decoder's model runs under: the model's own (sdpa) for everything but a
# decoding step, which reads each row's own length where `RowReads` comes with the call.
ROWS_ATTENTION = "sabia_ift_rows"


class RowReads:
    """A decoding step's attention over each row's first `used[row]` slots of the cache store,
    nothing past them: FlashAttention's variable-length kernel where `flash` (CUDA, bf16 or
    fp16), else the same read as a length mask over the whole store (what the tests compare)."""

    def __init__(self, rows: int, size: int, device, flash: bool) -> None:
        import torch

        int32 = dict(dtype=torch.int32, device=device)
        self.size, self.flash = size, flash
        self.used = torch.zeros(rows, **int32)
        # One query a row; row r's keys begin at r x size in the flattened store.
        self.query_starts = torch.arange(rows + 1, **int32)
        self.key_starts = torch.arange(rows + 1, **int32) * size
        self.slot_ids = torch.arange(size, device=device)

    def __call__(self, query, key, value, scaling):
        import torch

        rows, heads, _, dim = query.shape
        if not self.flash:
            mask = (self.slot_ids < self.used[:, None])[:, None, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        # The store is (rows, size, heads, dim): flattened, one sequence of `size` slots a row.
        keys, values = key.transpose(1, 2), value.transpose(1, 2)
        if keys.shape[1] != self.size or not keys.is_contiguous():
            raise RuntimeError("RowReads needs the whole cache store, as SlotCache gives it with length = size")
        out = torch.ops.aten._flash_attention_forward(
            query.transpose(1, 2).reshape(rows, heads, dim), keys.reshape(-1, *keys.shape[2:]),
            values.reshape(-1, *values.shape[2:]), self.query_starts, self.key_starts, 1, self.size, 0.0, False,
            False, scale=scaling, seqused_k=self.used)[0]
        return out.view(rows, 1, heads, dim), None


def _rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, row_reads=None,
                    **kwargs):
    if row_reads is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return row_reads(query, key, value, scaling)


def _register_rows_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ROWS_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ROWS_ATTENTION, _rows_attention)
        AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)


def pick_fused(model) -> bool:
    """Whether a decoding step can run LLaMA's RMSNorm and rotary embedding as one Triton kernel
    each (Liger Kernel's): on CUDA in bf16 or fp16, for a LLaMA with liger-kernel installed."""
    import importlib.util

    import torch

    weight = model.get_input_embeddings().weight
    return (weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
            and getattr(model.config, "model_type", None) == "llama"
            and importlib.util.find_spec("liger_kernel") is not None)


@contextlib.contextmanager
def fused_small_kernels(model):
    """While it is open, `model`'s RMSNorms and its attention's rotary embedding run Liger's
    kernels: at batch 64 a 7B step spent about 2 of its 17 ms in the six to ten small kernels
    each of them launches in transformers' code, a layer at a time (BENCHMARKS.md). Both
    compute what transformers' code does, in the same dtypes (the norm in fp32, cast before the
    weight), through other reduction orders. Captured graphs keep the kernels after it closes."""
    import sys

    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    modeling = sys.modules[type(model.get_decoder()).__module__]
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]

    def fused_norm(norm):
        return lambda x: LigerRMSNormFunction.apply(x, norm.weight, norm.variance_epsilon, 0.0, "llama", False, None)

    own_rope = modeling.apply_rotary_pos_emb
    for norm in norms:
        norm.forward = fused_norm(norm)
    modeling.apply_rotary_pos_emb = liger_rotary_pos_emb
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = own_rope
        for norm in norms:
            del norm.forward


def pick_attention(model) -> str:
    """"rows" where a decoding step can read each row's own length through FlashAttention's
    variable-length kernel (CUDA, sm80 or newer, bf16 or fp16, a model under sdpa), else "mask"."""
    import torch

    weight = model.get_input_embeddings().weight
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    usable = (weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device)[0] >= 8
              and weight.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256
              and config._attn_implementation == "sdpa")
    return "rows" if usable else "mask"


class GreedyDecoder:
    """Answers batches of at most `rows` prompts whose prompt and answer fit `slots` tokens,
    greedily, as transformers' `generate` does for left-padded prompts (its position ids, its
    first-argmax tie rule). Rows past a batch's prompts are padding that attends to itself.

    `attention`: "rows" reads each row's own cache length in a decoding step (`RowReads`; off
    CUDA the same read as a length mask), "mask" reads the batch's longest through an attention
    mask in the model's own attention, "auto" `pick_attention`'s choice. `fused`: the model's
    norms and rotary embedding as Liger's kernels while it decodes (`fused_small_kernels`);
    None where `pick_fused` says they run."""

    def __init__(self, model, *, rows: int, slots: int, max_new_tokens: int, pad_token_id: int,
                 eos_token_id: int | None, attention: str = "auto", fused: bool | None = None) -> None:
        import torch

        self.model, self.rows, self.slots = model, rows, round_slots(slots)
        self.pad, self.eos = pad_token_id, eos_token_id
        device = model.get_input_embeddings().weight.device
        self.device = device
        self.graphed = device.type == "cuda"
        if attention == "auto":
            attention = pick_attention(model)
        if attention not in ("rows", "mask"):
            raise ValueError(f"attention must be auto, rows or mask, not {attention!r}")
        if attention == "rows" and model.config._attn_implementation != "sdpa":
            raise ValueError(f"attention rows needs a model under sdpa, not {model.config._attn_implementation!r}")
        self.attention = attention
        self.fused = pick_fused(model) if fused is None else fused
        self.cache = SlotCache(self.slots, rows)
        self.reads = RowReads(rows, self.slots, device, flash=pick_attention(model) == "rows") \
            if attention == "rows" else None
        long = dict(dtype=torch.long, device=device)
        # The decoding step's inputs and outputs: fixed tensors the graphs read and write in place.
        self.tokens = torch.full((rows, 1), pad_token_id, **long)
        self.positions = torch.zeros((rows, 1), **long)
        self.row_ids = torch.arange(rows, **long)
        self.row_slots = torch.zeros(rows, **long)
        self.written = torch.zeros(1, **long)
        self.keymask = torch.zeros((rows, 1, 1, self.slots), dtype=torch.bool, device=device)
        self.opened = torch.ones((), dtype=torch.bool, device=device)
        self.answers = torch.full((rows, max_new_tokens), pad_token_id, **long)
        self.graphs: dict[int, Any] = {}
        # Prompt tokens given, and token positions the prefill computed (padding rows and columns
        # included, a shared beginning once): what sharing saves, for the log and the benchmarks.
        self.prompt_tokens = self.prefill_tokens = 0

    def _forward(self, input_ids, mask, positions, length: int, reads=None):
        self.cache.length = length
        extra = {"row_reads": reads} if reads is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                         use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1].argmax(-1)

    def _step(self, length: int) -> None:
        # The new token's own slot opens before attention reads it.
        self.keymask.view(self.rows, self.slots).index_put_((self.row_ids, self.row_slots), self.opened)
        self.cache.row_slots = self.row_slots
        if self.reads is not None:
            self.reads.used.copy_(self.row_slots + 1)
        try:
            chosen = self._forward(self.tokens, self.keymask[..., :length], self.positions, length, self.reads)
        finally:
            self.cache.row_slots = None
        self.answers.index_copy_(1, self.written, chosen[:, None])
        self.tokens.copy_(chosen[:, None])
        self.positions.add_(1)
        self.row_slots.add_(1)
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
        # the capture records), then is captured; capturing runs nothing. The graphs share one
        # memory pool: they never run at once.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._step(length)
        self.graphs[length] = graph

    def decode(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's answer token ids, cut after its first EOS (kept), at most `max_new_tokens`."""
        width = max(map(len, prompts))
        if len(prompts) > self.rows or width + max_new_tokens > self.slots or max_new_tokens > self.answers.shape[1]:
            raise ValueError(f"{len(prompts)} prompts of up to {width} tokens and {max_new_tokens} new tokens "
                             f"do not fit a decoder of {self.rows} rows and {self.slots} slots")
        with self.own_kernels():
            return self._decode(prompts, max_new_tokens)

    @contextlib.contextmanager
    def own_kernels(self):
        """The model under the decoder's attention (for row reads, the attention function that
        takes them) and, with `fused`, Liger's norm and rotary kernels; as it was afterwards."""
        config = self.model.config
        own = config._attn_implementation
        if self.attention == "rows":
            _register_rows_attention()
            config._attn_implementation = ROWS_ATTENTION
        try:
            with fused_small_kernels(self.model) if self.fused else contextlib.nullcontext():
                yield
        finally:
            config._attn_implementation = own

    def _decode(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

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
        lengths = [len(p) for p in prompts] + [0] * (self.rows - len(prompts))
        with torch.no_grad():
            if shared:
                # One row computes the shared beginning; the cache copies it to every row.
                self.cache.slots = torch.arange(shared, device=self.device)
                self._forward(ids[:1, :shared], mask[:1, None, :shared, :shared], positions[:1, :shared], shared)
            self.cache.slots = torch.arange(shared, width, device=self.device)
            first = self._forward(ids[:, shared:], mask[:, None, shared:], positions[:, shared:], width)
            self._close_gaps(lengths, shared, width)
            self.answers[:, 0] = first
            self.tokens[:, 0] = first
            self.positions[:, 0] = real.sum(-1)
            self.row_slots.copy_(torch.tensor(lengths))
            self.written.fill_(1)
            self.keymask.copy_((torch.arange(self.slots) < torch.tensor(lengths)[:, None])[:, None, None, :])
            steps = 1
            while steps < max_new_tokens:
                if (self.eos is not None and steps % _CHECK_EVERY == 0
                        and self._all_ended(len(prompts), steps, self.eos)):
                    break
                # This step writes slot length + steps - 1 of each row, so the longest row reads
                # width + steps slots; with row reads one graph serves every step.
                self._run_step(self.slots if self.attention == "rows" else round_slots(width + steps))
                steps += 1
        answers = self.answers[: len(prompts), :steps].tolist()
        return [a[: a.index(self.eos) + 1] if self.eos in a else a for a in answers]

    def _close_gaps(self, lengths: list[int], shared: int, width: int) -> None:
        """Each row's own tokens moved to follow the shared beginning, so that a row's cache is
        its first `length` slots: the padding between them is what a decoding step would read."""
        import torch

        source, target = [], []
        for row, length in enumerate(lengths):
            rest, gap = length - shared, width - length
            if length and gap:
                base = row * self.slots
                target.append(torch.arange(base + shared, base + shared + rest))
                source.append(torch.arange(base + shared + gap, base + width))
        if source:
            self.cache.move(torch.cat(source).to(self.device), torch.cat(target).to(self.device))

    def _all_ended(self, count: int, steps: int, eos: int) -> bool:
        import torch

        return bool(torch.eq(self.answers[:count, :steps], eos).any(-1).all())
