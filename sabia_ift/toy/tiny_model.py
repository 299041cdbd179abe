"""The embedded default's base model: a small LLaMA, pretrained here as a plain language model.

A randomly initialised model cannot show what instruction tuning does: with a
frozen random output layer its logits stay near uniform whatever LoRA learns.
So the base stage gives the tiny model what Sabiá-7B has and the tuning must
not supply: Portuguese text statistics, learned from plain documents (sample
rows drawn with other seeds than the bundled sample, written as running text,
no template). It has never seen the instruction template, and its documents
are separated by BOS only, so it has never seen EOS either: whatever the
evaluation measures of following the template and stopping after an answer
comes from the tuning, and a tuning that lost its EOS labels (the earlier
attempt's bug) shows up as an EOS-stop rate near zero.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifacts import BaseInfo
from ..config import TinyModelConfig
from ..io import atomic_path
from .sample import generate_rows, is_planted_defect


def sentencepiece_model_path() -> Path:
    """A 32,000-token LLaMA-style sentencepiece model that ships with mistral-common (Apache-2.0)."""
    import mistral_common

    from ..errors import ModelError

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise ModelError(f"{path}: the tiny model's tokenizer file is missing; reinstall mistral-common")
    return path


def pretraining_documents(n: int, first_seed: int) -> list[str]:
    """`n` short Portuguese documents: a question (with its context) and its answer, as prose."""
    docs: list[str] = []
    seed = first_seed
    while len(docs) < n:
        for i, row in enumerate(generate_rows(seed)):
            if is_planted_defect(i):
                continue
            parts = [row["instruction"], row["input"], row["output"]]
            docs.append(" ".join(p for p in parts if p))
            if len(docs) == n:
                break
        seed += 1
    return docs


def pack(token_lists: list[list[int]], block: int) -> list[list[int]]:
    """Concatenate documents and cut fixed blocks: no padding at all in pretraining."""
    stream = [t for ids in token_lists for t in ids]
    return [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]


def pretrain(model, tokenizer, cfg: TinyModelConfig) -> list[float]:
    """Full-parameter next-token training on the documents; returns the loss per step."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    docs = pretraining_documents(cfg.pretrain_documents, cfg.corpus_seed)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(pack([[tokenizer.bos_token_id, *ids] for ids in encoded], cfg.pretrain_block))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.pretrain_epochs * (len(blocks) // cfg.pretrain_batch)
    # fused: its CPU kernel's square roots are torch's own, not MKL's (determinism.py says why).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    model.train()
    losses = []
    for _ in range(cfg.pretrain_epochs):
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - cfg.pretrain_batch + 1, cfg.pretrain_batch):
            batch = blocks[order[start:start + cfg.pretrain_batch]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path) -> dict:
    """Build, pretrain and save the tiny base model with a real 32k LLaMA-style tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    with atomic_path(out_dir, is_dir=True) as tmp:
        shutil.copyfile(sentencepiece_model_path(), tmp / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(tmp))
        (tmp / "tokenizer.model").unlink()
        tokenizer.save_pretrained(str(tmp))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
        losses = pretrain(model, tokenizer, cfg) if cfg.pretrain_epochs else []
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        model.save_pretrained(str(tmp))
        info = BaseInfo(source="tiny", details={
            "config": cfg.model_dump(),
            "pretrain_steps": len(losses),
            "pretrain_first_loss": losses[0] if losses else None,
            "pretrain_last_loss": losses[-1] if losses else None,
        })
        info.write(tmp)
    return info.to_dict()
