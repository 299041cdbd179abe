"""`sabia-ift export`: merge the adapter into a standalone model, and publish adapter or model.

The merge loads the base unquantised, in the export dtype, and folds the
LoRA update into its weights. It never merges into 4-bit weights: rounding
the merged matrix back to NF4 would throw away most of the small LoRA update,
and the result would not be the model that was evaluated. A QLoRA adapter is
merged into the base loaded in full precision; a base whose weights are
stored in 4-bit is dequantised first.

The exported model must answer like the evaluated one. Its tokenizer carries
the training prompt as a chat template (exactly the training ids), its
generation config is greedy and stops at EOS, its dtype is by default the one
`sabia-ift generate` runs the adapter in, and the export measures how many
greedy answers to test prompts the two models share, and says so in the card.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..artifacts import TrainMeta
from ..destination import check_destination, check_file_destination, new_folder
from ..errors import ConfigError, DataError, ModelError
from ..io import read_jsonl
from ..model_card import CARD, gather, write_card
from ..modeling import load_model, load_tokenizer, load_tuned, model_folder, pick_device, pick_dtype, resolve_base
from ..template import build_prompt, chat_messages, chat_template_for, encode_prompt

MERGE_DTYPES = ("bf16", "fp16", "fp32")
# `sabia-ift generate`'s default answer length, which the card's snippet writes out and the agreement
# check uses (tests/test_export.py holds the three together).
MAX_NEW_TOKENS = 128


def check_dtype(name: str) -> None:
    if name in ("nf4", "4bit", "int4"):
        raise ConfigError(
            f"--dtype {name}: merging into 4-bit weights is refused: rounding the merged weights to 4 bits "
            "would lose most of the LoRA update. Merge in bf16 or fp32 (auto picks the dtype the model was "
            "evaluated in); quantise the merged model afterwards if you need it small, and evaluate it again"
        )
    if name not in ("auto", *MERGE_DTYPES):
        raise ConfigError(f"--dtype {name}: choose auto, {', '.join(MERGE_DTYPES)}")


def resolve_dtype(name: str, meta: TrainMeta, device: str) -> str:
    """The dtype `--dtype name` asks for; auto is the one the evaluated model runs in on `device`,
    as `sabia-ift generate` and the evaluate stage load it (modeling.load_tuned)."""
    check_dtype(name)
    if name != "auto":
        return name
    if meta.precision != "auto":
        name = meta.precision
    else:
        import torch

        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[pick_dtype("auto", device)]
    # A 4-bit base computes in bf16 where the precision says fp32 (modeling.load_model).
    return "bf16" if meta.quantization == "nf4" and name == "fp32" else name


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_unquantised(folder: Path, dtype, device: str):
    """The base in `dtype` with every weight a plain tensor: 4-bit stored weights are dequantised."""
    model = load_model(folder, quantization="none", double_quant=False, dtype=dtype, device=device)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", "quantised")
        try:
            model = model.dequantize(dtype=dtype)
        except (NotImplementedError, ValueError, ImportError, RuntimeError) as exc:
            raise ModelError(f"{folder}: the base's weights are stored quantised ({method}) and cannot be "
                             f"dequantised ({type(exc).__name__}: {exc}); give --base a folder with its "
                             "full-precision weights") from None
        model = model.to(dtype)  # dequantize leaves the layers it did not quantise in their stored dtype
    left = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}
                  | {str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if left:
        raise ModelError(f"{folder}: the base still holds quantised weights after loading ({', '.join(left)}); "
                         "give --base a folder with its full-precision weights")
    return model


@dataclass(frozen=True)
class Agreement:
    """How many greedy answers of the merged model equal the evaluated model's."""

    prompts: int
    agreeing: int
    source: str
    device: str
    max_new_tokens: int = MAX_NEW_TOKENS

    @property
    def share(self) -> float:
        return self.agreeing / self.prompts

    def line(self) -> str:
        return (f"{self.agreeing} of {self.prompts} greedy answers equal the evaluated model's "
                f"({self.share:.0%}, test prompts of {self.source}, at most {self.max_new_tokens} new tokens, "
                f"{self.device})")


def chat_answer(model, tokenizer, instruction: str, input: str = "", max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model card's snippet: plain transformers, the chat template, greedy."""
    inputs = tokenizer.apply_chat_template(chat_messages(instruction, input), add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt",
                                           sanitize_control_tokens=True).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_agreement(folder: Path, base_dir: str | Path, adapter_dir: str | Path, rows: list[dict[str, Any]],
                      source: str, device: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Agreement:
    """Greedy answers of the evaluated model (base + adapter, loaded as evaluation loads it) and of the
    merged model in `folder` (loaded and asked as its card says), compared text for text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluation.generation import generate

    tokenizer, tuned = load_tuned(base_dir, adapter_dir, device)
    prompts = [encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input") or "")) for r in rows]
    expected = [g.text for g in generate(tuned, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=1,
                                         device=device,
                                         context_length=getattr(tuned.config, "max_position_embeddings", None))]
    del tuned
    _free(device)
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto",
                                                  device_map={"": device} if device == "cuda" else None)
    chat_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    got = [chat_answer(merged, chat_tokenizer, r["instruction"], r.get("input") or "", max_new_tokens) for r in rows]
    del merged
    _free(device)
    return Agreement(len(rows), sum(a == b for a, b in zip(expected, got)), source, device, max_new_tokens)


def agreement_rows(path: str | Path | None, count: int) -> tuple[list[dict[str, Any]], str | None]:
    """The first `count` rows of the test split, and why there are none when there are none."""
    if count == 0:
        return [], "not measured (--check-prompts 0)"
    if path is None:
        return [], "not measured (no test prompts given)"
    if not Path(path).is_file():
        return [], f"not measured: no test prompts at {path} (run the format stage, or pass --prompts FILE)"
    rows = read_jsonl(path)[:count]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("input", ""), str):
            raise DataError(f"{path}: row {number}: --prompts takes rows with a text 'instruction' (and "
                            "optional 'input'), as data/formatted/test.jsonl holds them")
    return rows, None if rows else f"not measured: {path} holds no rows"


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
          device: str = "auto", overwrite: bool = False, prompts: str | Path | None = None, check_prompts: int = 8,
          repo_id: str | None = None, params: str | Path | None = "params.yaml",
          manifest: str | Path | None = "data/raw/manifest.json",
          metrics_dir: str | Path | None = "metrics", log=print) -> Path:
    """Write base + adapter as one safetensors model, with tokenizer (chat template), generation config and card.

    OUT must be new or empty (or `overwrite`), and never a folder of the
    project's own (destination.py); it is written whole or not at all.
    """
    from peft import PeftModel
    from transformers import GenerationConfig

    if check_prompts < 0:
        raise ConfigError(f"--check-prompts {check_prompts}: give a count of 0 or more (0 skips the check)")
    meta = TrainMeta.read(adapter_dir)
    device = pick_device(device, "--device")
    name = resolve_dtype(dtype, meta, device)
    folder = model_folder(resolve_base(base_dir))
    target = check_destination(out_dir, flag="--merged", overwrite=overwrite,
                               reads={"the base model it reads": base_dir, "the base model's weights": folder,
                                      "the adapter it reads": adapter_dir})
    rows, not_measured = agreement_rows(prompts, check_prompts)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = chat_template_for(tokenizer)
    base = load_unquantised(folder, _torch_dtype(name), device)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as exc:
        raise ModelError(f"{adapter_dir}: not a loadable PEFT adapter for this base model: "
                         f"{type(exc).__name__}: {exc}") from None
    merged = model.merge_and_unload()
    del model, base
    # Greedy, stopping at EOS and padding with the tokenizer's pad (never EOS), as `sabia-ift generate` does;
    # the base's own generation settings were never used in evaluation.
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    merged.generation_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, **ids)
    for key, value in ids.items():
        setattr(merged.config, key, value)
    merged.config.use_cache = True
    facts = gather(meta.base, params=params, manifest=manifest, metrics_dir=metrics_dir)
    with new_folder(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del merged
        _free(device)
        agreement = None
        if rows:
            log(f"comparing greedy answers of the merged and the evaluated model on {len(rows)} test prompts")
            agreement = measure_agreement(tmp, base_dir, adapter_dir, rows, str(prompts), device)
        write_card(tmp, facts, "merged", repo_id=repo_id, chat=True,
                   export={"dtype": name, "dtype_asked": dtype, "device": device,
                           "agreement": asdict(agreement) if agreement else None, "not_measured": not_measured})
    log(f"merged model written to {out_dir} ({name}, safetensors, tokenizer with the chat template, {CARD})")
    log(f"agreement with the evaluated model: {agreement.line() if agreement else not_measured}")
    return Path(out_dir)


def portable_adapter(adapter_dir: str | Path, base_dir: str | Path, dest: str | Path, *,
                     params: str | Path | None = "params.yaml",
                     manifest: str | Path | None = "data/raw/manifest.json",
                     metrics_dir: str | Path | None = "metrics", repo_id: str | None = None) -> Path:
    """A copy of the adapter folder with its tokenizer (and chat template) and the full card (data, metrics).

    The DVC output itself is left as the train stage wrote it.
    """
    meta = TrainMeta.read(adapter_dir)
    dest = Path(dest)
    shutil.copytree(adapter_dir, dest, dirs_exist_ok=True)
    if (dest / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(dest)
    else:
        tokenizer = load_tokenizer(model_folder(resolve_base(base_dir)))
    tokenizer.chat_template = chat_template_for(tokenizer)
    tokenizer.save_pretrained(str(dest))
    write_card(dest, gather(meta.base, params=params, manifest=manifest, metrics_dir=metrics_dir), "adapter",
               repo_id=repo_id, chat=True)
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


def write_gguf_file(folder: Path, out: Path, kind: str, *, prompts: str | Path | None, check_prompts: int,
                    log=print) -> Path:
    """The merged model in `folder` as one GGUF file, with llama.cpp's greedy agreement recorded in it."""
    from . import gguf_file

    tokenizer = load_tokenizer(folder)
    rows, not_measured = agreement_rows(prompts, check_prompts)
    template = gguf_file.chat_template_for_gguf(folder, tokenizer)

    def measure(path: Path) -> dict[str, Any]:
        if not rows:
            return {"type": kind, "not_measured": not_measured}
        log(f"comparing greedy answers of llama.cpp ({kind}) and the merged model on {len(rows)} test prompts")
        return gguf_file.measure(path, folder, rows, template, MAX_NEW_TOKENS, str(prompts), kind)

    gguf_file.write_gguf(folder, out, kind, chat_template=template, tokenizer=tokenizer,
                         name=f"sabia-ift {folder.name}", measure=measure)
    log(f"GGUF file written to {out} ({kind}, llama architecture, tokenizer and chat template)")
    log(gguf_file.agreement_line(gguf_file.read_agreement(out)))
    return out


def export(base_dir: str | Path, adapter_dir: str | Path, *, merged: str | Path | None,
           push_to: str | None, dtype: str = "auto", device: str = "auto", overwrite: bool = False,
           prompts: str | Path | None = None, check_prompts: int = 8, private: bool = True,
           params: str | Path | None = "params.yaml", manifest: str | Path | None = "data/raw/manifest.json",
           metrics_dir: str | Path | None = "metrics", gguf: tuple[str, str | Path] | None = None,
           log=print) -> None:
    """What `sabia-ift export` does: merge if asked, write GGUF if asked, then push the merged model or else
    the adapter."""
    if merged is None and push_to is None and gguf is None:
        raise ConfigError("nothing to export: give --merged OUT (a standalone model), --gguf TYPE PATH "
                          "(one llama.cpp file) and/or --push-to-hub REPO (publishes the merged model if "
                          "--merged is given, else the adapter)")
    if merged is not None or gguf is not None:
        check_dtype(dtype)
    gguf_target = None
    if gguf is not None:
        from . import gguf_file

        gguf_file.check_type(gguf[0])
        gguf_file.require_gguf()
        reads: dict[str, str | Path] = {"the base model it reads": base_dir, "the adapter it reads": adapter_dir}
        if merged is not None:
            reads["the merged model folder it writes"] = merged
        gguf_target = check_file_destination(gguf[1], flag="--gguf", overwrite=overwrite, reads=reads)
    if push_to is not None and _offline():
        # Fail before minutes of merging, not after.
        raise ModelError(f"cannot push to {push_to}: HF_HUB_OFFLINE is set. Unset it on a machine that "
                         "reaches huggingface.co, or export with --merged only and upload the folder yourself")
    if merged is not None:
        out = merge(base_dir, adapter_dir, merged, dtype=dtype, device=device, overwrite=overwrite, prompts=prompts,
                    check_prompts=check_prompts, repo_id=push_to, params=params, manifest=manifest,
                    metrics_dir=metrics_dir, log=log)
        if gguf is not None and gguf_target is not None:
            write_gguf_file(out, gguf_target, gguf[0], prompts=prompts, check_prompts=check_prompts, log=log)
        if push_to is not None:
            log(f"published: {push(out, push_to, private=private)}")
        return
    if gguf is not None and gguf_target is not None:
        # The merged model is a temporary folder beside the file (same disk, removed whatever happens).
        parent = next(p for p in (gguf_target.parent, *gguf_target.parents) if p.is_dir())
        with tempfile.TemporaryDirectory(prefix=f".{gguf_target.name}.merge-", dir=parent) as tmp:
            folder = merge(base_dir, adapter_dir, Path(tmp) / "merged", dtype=dtype, device=device, prompts=None,
                           check_prompts=0, params=params, manifest=manifest, metrics_dir=metrics_dir,
                           log=lambda _: None)
            write_gguf_file(folder, gguf_target, gguf[0], prompts=prompts, check_prompts=check_prompts, log=log)
        if push_to is None:
            return
    with tempfile.TemporaryDirectory() as tmp:
        folder = portable_adapter(adapter_dir, base_dir, Path(tmp) / "adapter", params=params, manifest=manifest,
                                  metrics_dir=metrics_dir, repo_id=push_to)
        log(f"published: {push(folder, push_to, private=private)}")  # type: ignore[arg-type]
