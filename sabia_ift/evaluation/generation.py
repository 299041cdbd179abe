"""Greedy, batched, left-padded generation that reports whether each answer stopped at EOS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    # True when the model ended the answer with EOS before max_new_tokens:
    # the earlier attempt's model never did.
    stopped: bool


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

    from ..errors import ModelError

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if context_length is not None:
        longest = max((len(p) for p in prompts), default=0)
        if longest >= context_length:
            raise ModelError(f"a prompt of {longest} tokens leaves no room in the model's "
                             f"{context_length}-token context; shorten it")
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
            new = out[row, width:].tolist()
            stopped = eos in new
            if stopped:
                new = new[: new.index(eos)]
            results[i] = Generation(
                text=tokenizer.decode(new, skip_special_tokens=True).strip(),
                new_tokens=len(new) + int(stopped),
                stopped=stopped,
            )
        if progress is not None:
            progress(len(idx))
    return results  # type: ignore[return-value]
