"""lm-eval's HFLM, scoring log-likelihoods from the continuation's logits only.

lm-eval 0.4.13's HFLM runs the model over the right-padded batch and takes
log_softmax over the whole (batch, sequence, vocabulary) logits before it
picks each row's continuation positions: with exam-length prompts, a 32,000
token vocabulary and a batch of 16 that is gigabytes, twice over (logits and
log-probabilities), for one or two positions per row that are read. Here the
model is asked for those positions only (transformers' `logits_to_keep`, one
row of positions per example, as transformers 5's LLaMA takes it), so the
vocabulary projection and log_softmax see (batch, longest continuation,
vocabulary) whatever the prompt length. Batching, request order, truncation
and the one-token continuation cache are lm-eval's own; the numbers are the
same.

With `fast_generation` (the benchmark stage's fast engine, on a plain bf16 copy
of the model), greedy generate_until requests are answered by the evaluate
stage's engine (generation.fast_generate: prompts sorted by length, batches
sized from free memory, one task at a time so that a batch's prompts share the
task's few-shot block and the decoder prefills it once) instead of lm-eval's
fixed batches; prompts, stop strings and the text returned are lm-eval's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, has_bos_prefix
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

from ..progress import interactive

Request = tuple[tuple[str, str], list[int], list[int]]  # (strings, context tokens, continuation tokens)


def _longest_first(request: Request) -> tuple[int, tuple[int, ...]]:
    # lm-eval's order: the first batch is the longest, so a batch that does not fit fails at once.
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _same_prefix(request: Request) -> list[int]:
    # Requests whose context + continuation differ only in the last token share one forward pass.
    return request[1] + request[2][:-1]


def continuation_positions(lengths: list[int], keep: int) -> torch.Tensor:
    """(rows, keep) positions: the last `keep` of each right-padded row of `lengths` tokens, where
    a row's continuation is predicted (clamped at 0 for rows shorter than `keep`)."""
    return torch.stack([torch.arange(n - keep, n) for n in lengths]).clamp(min=0)


class ContinuationHFLM(HFLM):
    """HFLM whose loglikelihood requests keep only the continuation positions' logits.

    Its progress bars show only on a terminal: lm-eval's evaluator asks for every bar
    (`disable_tqdm=False`), and in a log that is not a terminal (`dvc repro` in CI) each
    redrawn bar piles up into one unreadable line.
    """

    # Set on an instance whose model is a plain copy (generation.inference_copy): greedy
    # generation then goes through generation.fast_generate.
    fast_generation = False

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not interactive())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not interactive())

    def generate_until(self, requests, disable_tqdm: bool = False):
        disable = disable_tqdm or not interactive()
        if not self.fast_generation or self.backend != "causal" or self.think_end_token is not None:
            return super().generate_until(requests, disable_tqdm=disable)
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from .generation import fast_generate

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[tuple[str | None, str], list[int]] = {}
        for i, request in enumerate(requests):
            # One task's prompts together: they share its few-shot block, which the decoder
            # then computes once a batch (decoding.shared_prefix).
            groups.setdefault((request.task_name, repr(sorted(request.args[1].items()))), []).append(i)
        results: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable or self.rank != 0, desc="Running generate_until requests")
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or set(kwargs) - {"do_sample", "temperature"}:
                # Sampling or other generate options: lm-eval's own path honours them.
                for i, text in zip(indices, super().generate_until([requests[i] for i in indices], disable),
                                   strict=True):
                    results[i] = text
                continue
            room = self.max_length - new_tokens
            prompts = [self._context_ids(requests[i].args[0])[-room:] for i in indices]
            answers = fast_generate(self.model, self.tokenizer, prompts, max_new_tokens=new_tokens, plain=self.model,
                                    progress=progress.update)
            for i, answer in zip(indices, answers, strict=True):
                text = postprocess_generated_text(generation=self.tok_decode(list(answer.token_ids)), stop=until,
                                                  think_end_token=None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        progress.close()
        return results

    def _context_ids(self, context: str) -> list[int]:
        # lm-eval's tok_batch_encode for one string: BOS as its add_bos_token says, no padding.
        special = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(context, **special)["input_ids"]

    def continuation_logits(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at `positions` (rows, k) of right-padded `inputs` (rows, length): (rows, k, vocab)."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(inputs, logits_to_keep=positions.to(inputs.device)).logits
        if logits.shape[:2] != positions.shape:
            # A model that ignores logits_to_keep would have every position read as a continuation's.
            raise RuntimeError(f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)} for "
                               f"positions {tuple(positions.shape)}: it does not take a 2-D logits_to_keep")
        return logits

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        peft_config = getattr(self.model, "active_peft_config", None)
        if self.backend != "causal" or getattr(peft_config, "is_prompt_learning", False):
            # Encoder-decoders and virtual-token adapters place their logits differently.
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        collator = Collator(requests, sort_fn=_longest_first, group_fn=_same_prefix,
                            group_by="contexts" if self.logits_cache else None)
        batch_fn: Any = None
        if self.batch_size == "auto" and not override_bs and len(collator):
            batch_fn = self._batch_scheduler
            self.batch_sizes: dict[int, int] = {}  # detected afresh for these requests, as lm-eval does
        batch_size = (override_bs or 0) if self.batch_size == "auto" else self.batch_size
        results: list[tuple[float, bool]] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=batch_size, batch_fn=batch_fn):
            # The input is context + continuation less its last token, cut from the left to the window.
            windows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            keep = max(len(continuation) for _, _, continuation in chunk)
            inputs = pad_and_concat(max(map(len, windows)),
                                    [torch.tensor(w, dtype=torch.long, device=self.device) for w in windows],
                                    padding_side="right")
            logits = self.continuation_logits(inputs, continuation_positions([len(w) for w in windows], keep))
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # (rows, keep, vocab)
            for (strings, context, continuation), row in zip(chunk, logprobs, strict=True):
                row = row[keep - len(continuation):].unsqueeze(0)  # (1, continuation, vocab)
                greedy = row.argmax(dim=-1)
                for request_strings, tokens, scores in collator.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=row):
                    target = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(0)
                    # A request sharing this pass may have a shorter continuation: its tokens are the last ones.
                    picked = scores[:, -target.shape[1]:].gather(2, target.unsqueeze(-1))
                    answer = (float(picked.sum()), bool((greedy[:, -target.shape[1]:] == target).all()))
                    results.append(answer)
                    if request_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", request_strings, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)
