"""Greedy, batched, left-padded generation that reports whether each answer stopped at EOS."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    # True when the model ended the answer with EOS before max_new_tokens:
    # the earlier attempt's model never did.
    stopped: bool
    # The answer's token ids, EOS left out: what a caller that decodes differently reads
    # (lm-eval cuts at its stop strings before stripping anything).
    token_ids: tuple[int, ...] = ()


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             device: str, context_length: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[Generation]:
    """Continue each tokenized prompt (BOS included) greedily, in batches of similar length.

    With `context_length`, prompt + answer never exceed it: a batch whose longest
    prompt leaves less room gets fewer new tokens; a prompt that fills the
    context on its own is a ModelError. `progress`, if given, is called with the
    number of prompts each finished batch answered (a sabia_ift.progress.Progress fits).
    """
    import torch
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    _refuse_full_context(prompts, context_length)
    # Sorting by length keeps left padding short; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[Generation | None] = [None] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        budget = max_new_tokens if context_length is None else min(max_new_tokens, context_length - width)
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=budget,
            eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
        )
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=config)
        for row, i in enumerate(idx):
            results[i] = _answer(tokenizer, out[row, width:].tolist())
        if progress is not None:
            progress(len(idx))
    return results  # type: ignore[return-value]


def _refuse_full_context(prompts: list[list[int]], context_length: int | None) -> None:
    """A ModelError when a prompt leaves no room for an answer in the model's context."""
    from ..errors import ModelError

    longest = max((len(p) for p in prompts), default=0)
    if context_length is not None and longest >= context_length:
        raise ModelError(f"a prompt of {longest} tokens leaves no room in the model's "
                         f"{context_length}-token context; shorten it")


def _answer(tokenizer, new: list[int]) -> Generation:
    """The Generation of answer token ids `new`, cut at the first EOS; what follows it is padding."""
    eos = tokenizer.eos_token_id
    stopped = eos in new
    if stopped:
        new = new[: new.index(eos)]
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True).strip(),
                      new_tokens=len(new) + int(stopped), stopped=stopped, token_ids=tuple(new))


# Fast generation --------------------------------------------------------------------------------
#
# A 4-bit base dequantises every weight on every decoding step: at batch 64 on an H100 that
# was about 400-500 new tokens/s for a 7B. The fast engine answers from a plain copy of the
# weights in the compute dtype (the 4-bit ones dequantised: the same numbers the 4-bit
# layers multiply by; the adapter merged when it is on), over prompts sorted by length, in
# batches as large as the card's free memory holds for their KV cache, each decoding step one
# CUDA graph replay (decoding.py). HF generate eager, its compiled static cache and its
# continuous batching were measured on the same copy and were slower (BENCHMARKS.md).

# What the KV cache and activations need beside the copy, as a share of the copy's bytes:
# below this the 4-bit path answers instead.
_HEADROOM = 0.25
# Share of the free memory the batch may plan to use; the rest absorbs what the estimate misses.
_BATCH_SHARE = 0.7
_copies: dict[int, tuple[bool, Any]] = {}
_engines: dict[int, str] = {}


def adapter_enabled(model) -> bool:
    """Whether a PeftModel's LoRA layers are on (False inside `model.disable_adapter()`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and not any(m.disable_adapters for m in layers)


def _compute_dtype(model):
    return model.get_input_embeddings().weight.dtype


def copy_bytes(model) -> int:
    """Bytes a plain copy of `model` in its compute dtype takes (parameters only)."""
    import torch

    size = torch.empty((), dtype=_compute_dtype(model)).element_size()
    count = 0
    for p in model.parameters():
        # A 4-bit weight packs two values a byte; peft's LoRA factors are not part of the copy.
        count += p.numel() * (2 if p.dtype == torch.uint8 else 1)
    return count * size


def inference_copy(model, merge: bool):
    """A plain transformers model with `model`'s weights in its compute dtype, on its device:
    4-bit weights dequantised, and with `merge` the active LoRA adapters added in."""
    import copy

    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = _compute_dtype(base)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    device = base.get_input_embeddings().weight.device
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = {}
    with torch.no_grad():
        for key in plain.state_dict():
            path, attr = key.rsplit(".", 1)
            source = base.get_submodule(path)
            if isinstance(source, LoraLayer) and attr == "weight":
                weight = dequantize_module_weight(source.get_base_layer()).to(dtype)
                if merge:
                    for name in source.active_adapters:
                        weight = weight + source.get_delta_weight(name).to(dtype)  # type: ignore[attr-defined]  # lora.Linear and its 4-bit form have it
            elif attr == "weight" and hasattr(getattr(source, "weight", None), "quant_state"):
                weight = dequantize_module_weight(source).to(dtype)
            else:
                weight = getattr(source.get_base_layer() if isinstance(source, LoraLayer) else source, attr)
            state[key] = weight.to(dtype) if weight.is_floating_point() else weight
        plain.load_state_dict(state, strict=True)
    del state
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


def _cached_copy(model, merge: bool):
    # One copy at a time: the base's and the tuned one's never share memory.
    held = _copies.get(id(model))
    if held is not None and held[0] == merge:
        return held[1]
    _copies.pop(id(model), None)
    _release()
    plain = inference_copy(model, merge)
    _copies[id(model)] = (merge, plain)
    return plain


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_copies() -> None:
    """Free the plain copies the fast engine holds."""
    _copies.clear()
    _release()


def pick_engine(model, device: str) -> str:
    """"fast" where a plain copy of the weights fits the card's free memory with room for
    the KV cache, "hf" (the loaded model, 4-bit where it is) elsewhere; logged once per model."""
    if device != "cuda":
        return "hf"
    if id(model) in _engines:
        return _engines[id(model)]
    import torch

    need = copy_bytes(model)
    free, _ = torch.cuda.mem_get_info()
    fits = free > need * (1 + _HEADROOM)
    _engines[id(model)] = "fast" if fits else "hf"
    log.info("generation: %s (a %s copy of the weights takes %.1f GB; %.1f GB of the card free)",
             "fast engine, HF generate on a plain copy" if fits else "4-bit model with HF generate",
             str(_compute_dtype(model)).removeprefix("torch."), need / 1e9, free / 1e9)
    return "fast" if fits else "hf"


def rows_that_fit(plain, longest: int, new_tokens: int, free_bytes: int) -> int:
    """How many rows of `longest` prompt tokens plus `new_tokens` answers fit `free_bytes`:
    each row's KV cache for the whole sequence and its widest prefill activation (the MLP's)."""
    config = plain.config
    element = plain.get_input_embeddings().weight.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    prefill = 3 * longest * getattr(config, "intermediate_size", 4 * config.hidden_size) * element
    per_row = kv_per_token * (longest + new_tokens) + prefill
    return max(1, int(free_bytes * _BATCH_SHARE) // per_row)


def fast_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                  context_length: int | None = None, batch_size: int | None = None,
                  progress: Callable[[int], None] | None = None, merge: bool | None = None,
                  plain=None, attention: str = "auto", fused: bool | None = None) -> list[Generation]:
    """What `generate` answers, from a plain copy of `model` (`inference_copy`; `plain` to
    give one) through a `decoding.GreedyDecoder` (on CUDA, one graph replay a step).
    `merge` defaults to whether the adapter is on. `batch_size` caps the rows decoded
    together; on CUDA every batch has as many rows as the card's free memory holds for the
    longest prompt and answer (`rows_that_fit`), one row count so that every batch replays
    the same graphs. A CUDA out-of-memory halves the rows and answers the rest of the
    prompts at that size; no answer is cut short for it. `attention` and `fused` are the
    decoder's (`decoding.GreedyDecoder`): each row's own cache length and Liger's norm and
    rotary kernels where the card allows them."""
    import torch

    from .decoding import GreedyDecoder, pick_attention, pick_fused, round_slots

    if not prompts:
        return []
    if plain is None:
        plain = _cached_copy(model, adapter_enabled(model) if merge is None else merge)
    device = plain.get_input_embeddings().weight.device
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    # Near the context a prompt gets the room it leaves (as `generate` gives it alone), so a
    # batch holds prompts of one answer budget only.
    _refuse_full_context(prompts, context_length)
    budget = [max_new_tokens if context_length is None else min(max_new_tokens, context_length - len(p))
              for p in prompts]
    slots = round_slots(max(len(p) + b for p, b in zip(prompts, budget, strict=True)))
    longest = len(prompts[order[-1]])
    rows = min(batch_size or len(prompts), len(prompts))
    if device.type == "cuda":
        # An earlier call's cache and graphs (the benchmark calls once a task) are freed but still
        # held by PyTorch's allocator, where the driver does not count them as free.
        _release()
        free, _ = torch.cuda.mem_get_info(device)
        rows = min(rows, rows_that_fit(plain, longest, slots - longest, free))
        attention = pick_attention(plain) if attention == "auto" else attention
        fused = pick_fused(plain) if fused is None else fused
        log.info("generation: %d rows a batch, %d cache slots (%.1f GB of the card free); decoding steps read %s%s",
                 rows, slots, free / 1e9, "each row's own cache length" if attention == "rows"
                 else "the batch's longest row through a mask", ", norms and rotary fused" if fused else "")
    results: list[Generation | None] = [None] * len(prompts)
    done, halved, decoder, prefilled = 0, False, None, 0
    start = time.perf_counter()
    while done < len(order):
        idx = [i for i in order[done:done + rows] if budget[i] == budget[order[done]]]
        try:
            if decoder is None:
                decoder = GreedyDecoder(plain, rows=rows, slots=slots, max_new_tokens=max(budget), attention=attention,
                                        fused=fused,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            before = decoder.prefill_tokens
            answers = decoder.decode([prompts[i] for i in idx], budget[idx[0]])
            prefilled += decoder.prefill_tokens - before
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            rows = max(1, min(rows, len(idx)) // 2)
            if not halved:
                log.warning("generation: CUDA out of memory; halving the batch to %d rows and going on", rows)
                halved = True
            decoder = None
            _release()
            continue
        for i, ids in zip(idx, answers, strict=True):
            results[i] = _answer(tokenizer, ids)
        done += len(idx)
        if progress is not None:
            progress(len(idx))
    # Padding counted; a beginning the prompts of a batch share (few-shot examples) counted once.
    # The wall time includes the first batch's graph captures: what a caller waits, per call
    # (the benchmark stage calls once a task).
    new_tokens = sum(r.new_tokens for r in results if r is not None)
    log.info("generation: %d prompts, %d new tokens in %.1f s; the prefill computed %d token positions for "
             "%d prompt tokens", len(prompts), new_tokens, time.perf_counter() - start, prefilled,
             sum(map(len, prompts)))
    return results  # type: ignore[return-value]


def generate_with(engine: str, model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                  batch_size: int, device: str, context_length: int | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[Generation], str]:
    """The answers and the engine that gave them: `engine` "fast" or "hf" as named, "auto" the
    fast engine where `pick_engine` says its copy fits (CUDA only), else `generate` with `batch_size`."""
    chosen = pick_engine(model, device) if engine == "auto" else engine
    if chosen == "fast":
        try:
            return fast_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 context_length=context_length, progress=progress), chosen
        finally:
            release_copies()  # the copy must not sit beside the next model or the loss pass
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    device=device, context_length=context_length, progress=progress), chosen
