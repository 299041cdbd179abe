"""`sabia-ift export`: merge the adapter into a standalone model, and publish adapter or model.

The merge loads the base in full precision (bf16 by default, fp32 or fp16 on
request) and folds the LoRA update into its weights. It never merges into
4-bit weights: rounding the merged matrix back to NF4 would throw away most
of the small LoRA update, and the result would not be the model that was
evaluated. A QLoRA adapter merged into the bf16 base differs from the 4-bit
model it was trained on only by the base's quantisation error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..artifacts import TrainMeta
from ..errors import ConfigError, ModelError
from ..io import atomic_path
from ..model_card import CARD, gather, write_card
from ..modeling import load_model, load_tokenizer, model_folder, pick_device, resolve_base

MERGE_DTYPES = ("bf16", "fp16", "fp32")


def _dtype(name: str):
    import torch

    if name in ("nf4", "4bit", "int4"):
        raise ConfigError(
            f"--dtype {name}: merging into 4-bit weights is refused: rounding the merged weights to 4 bits "
            "would lose most of the LoRA update. Merge in bf16 (the default) or fp32; quantise the merged "
            "model afterwards if you need it small, and evaluate it again"
        )
    if name not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {name}: choose one of {', '.join(MERGE_DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16",
          device: str = "cpu", params: str | Path | None = "params.yaml",
          manifest: str | Path | None = "data/raw/manifest.json",
          metrics_dir: str | Path | None = "metrics") -> Path:
    """Write base + adapter as one safetensors model, with tokenizer, generation config and card."""
    from peft import PeftModel

    torch_dtype = _dtype(dtype)
    meta = TrainMeta.read(adapter_dir)
    device = pick_device(device)
    folder = model_folder(resolve_base(base_dir))
    tokenizer = load_tokenizer(folder)
    # quantization="none" whatever training used: the merge needs the full-precision weights.
    base = load_model(folder, quantization="none", double_quant=False, dtype=torch_dtype, device=device)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as exc:
        raise ModelError(f"{adapter_dir}: not a loadable PEFT adapter for this base model: "
                         f"{type(exc).__name__}: {exc}") from None
    merged = model.merge_and_unload()
    # Generation stops at EOS and pads with the tokenizer's pad (never EOS), as evaluation did.
    gen = merged.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    merged.config.bos_token_id, merged.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True
    facts = gather(meta.base, params=params, manifest=manifest, metrics_dir=metrics_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, facts, "merged")
    return Path(out_dir)


def portable_adapter(adapter_dir: str | Path, base_dir: str | Path, dest: str | Path, *,
                     params: str | Path | None = "params.yaml",
                     manifest: str | Path | None = "data/raw/manifest.json",
                     metrics_dir: str | Path | None = "metrics", repo_id: str | None = None) -> Path:
    """A copy of the adapter folder with its tokenizer and the full card (data, metrics) added.

    The DVC output itself is left as the train stage wrote it.
    """
    meta = TrainMeta.read(adapter_dir)
    dest = Path(dest)
    shutil.copytree(adapter_dir, dest, dirs_exist_ok=True)
    if not (dest / "tokenizer_config.json").is_file():
        load_tokenizer(model_folder(resolve_base(base_dir))).save_pretrained(str(dest))
    write_card(dest, gather(meta.base, params=params, manifest=manifest, metrics_dir=metrics_dir), "adapter",
               repo_id=repo_id)
    return dest


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def push(folder: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Upload a folder to a Hub model repository; the token comes from HF_TOKEN (or a saved login)."""
    from huggingface_hub import HfApi, get_token

    if _offline():
        raise ModelError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set. Unset it on a machine that "
                         f"reaches huggingface.co, or upload {folder} yourself")
    if get_token() is None:
        raise ModelError(f"cannot push to {repo_id}: no Hugging Face token. Export HF_TOKEN (a token with "
                         "write access) or run `hf auth login`")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload from sabia-ift export")
    except Exception as exc:
        # The message of a failed request never holds the token; keep it to one line.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"push to {repo_id} failed: {type(exc).__name__}: {reason}. Check the network, "
                         "the repository name and that the token may write to it") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def export(base_dir: str | Path, adapter_dir: str | Path, *, merged: str | Path | None,
           push_to: str | None, dtype: str = "bf16", device: str = "cpu", private: bool = True,
           params: str | Path | None = "params.yaml", manifest: str | Path | None = "data/raw/manifest.json",
           metrics_dir: str | Path | None = "metrics", log=print) -> None:
    """What `sabia-ift export` does: merge if asked, then push the merged model or else the adapter."""
    if merged is None and push_to is None:
        raise ConfigError("nothing to export: give --merged OUT (a standalone model) and/or "
                          "--push-to-hub REPO (publishes the merged model if --merged is given, else the adapter)")
    _dtype(dtype)
    if push_to is not None and _offline():
        # Fail before minutes of merging, not after.
        raise ModelError(f"cannot push to {push_to}: HF_HUB_OFFLINE is set. Unset it on a machine that "
                         "reaches huggingface.co, or export with --merged only and upload the folder yourself")
    if merged is not None:
        out = merge(base_dir, adapter_dir, merged, dtype=dtype, device=device, params=params, manifest=manifest,
                    metrics_dir=metrics_dir)
        log(f"merged model written to {out} ({dtype}, safetensors, tokenizer, {CARD})")
        if push_to is not None:
            write_card(out, gather(TrainMeta.read(adapter_dir).base, params=params, manifest=manifest,
                                   metrics_dir=metrics_dir), "merged", repo_id=push_to)
            log(f"published: {push(out, push_to, private=private)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = portable_adapter(adapter_dir, base_dir, Path(tmp) / "adapter", params=params, manifest=manifest,
                                  metrics_dir=metrics_dir, repo_id=push_to)
        log(f"published: {push(folder, push_to, private=private)}")  # type: ignore[arg-type]
