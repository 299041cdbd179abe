"""Base model and tokenizer: where the base lives and how every stage loads it, the same way.

Every later stage reads the base through `models/base/base.json`, written by
the base stage, so tokenize, train and evaluate all load the same weights the
same way: from a local folder, or from a Hub id at a pinned commit (the HF
cache first, so an offline machine with a warm cache works).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import BASE_FILE, BaseInfo, TrainMeta
from .errors import ConfigError, ModelError, hub_errors

log = logging.getLogger(__name__)

# Weights are loaded from safetensors only: pickle-based .bin files can run code.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


@dataclass(frozen=True)
class BaseRef:
    """Where the base model lives: a local folder, or a Hub id at a commit."""

    name_or_path: str
    revision: str | None
    source: str

    @property
    def is_hub(self) -> bool:
        return self.source == "hub"


def _hub_error(repo_id: str, revision: str | None, exc: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    reason = str(exc).strip().rstrip(".")
    return ModelError(
        f"base model {repo_id} at revision {revision or 'main'} could not be loaded: "
        f"{type(exc).__name__}: {reason}. "
        + ("HF_HUB_OFFLINE is set and the HF cache does not hold it. " if offline else "")
        + "Check the network and that the id and revision exist; for a gated model, accept its "
        "license and export HF_TOKEN; or set base.name_or_path to a local folder."
    )


def snapshot(repo_id: str, revision: str | None, *, local_only: bool) -> Path:
    """The cached folder of a Hub model at a revision, downloading it unless `local_only`."""
    from huggingface_hub import snapshot_download

    try:
        # The token, if any, comes from HF_TOKEN in the environment; it is never passed or logged here.
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=local_only
        )
    except hub_errors() as exc:
        raise _hub_error(repo_id, revision, exc) from None
    return Path(path)


def check_model_folder(folder: Path, label: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{label}: no config.json in {folder}; not a transformers model folder")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())
        raise ModelError(
            f"{label}: no *.safetensors weights in {folder} (found: {', '.join(found) or 'nothing'}). "
            "Only safetensors are loaded; convert .bin weights with save_pretrained(safe_serialization=True)."
        )


def resolve_base(base_dir: str | Path) -> BaseRef:
    """Read what the base stage wrote and say where to load the model from."""
    info = BaseInfo.read(base_dir)
    if info.source in ("tiny", "local_copy"):
        return BaseRef(str(base_dir), None, "local")
    if not info.name_or_path:
        raise ModelError(f"{Path(base_dir) / BASE_FILE}: no name_or_path for source {info.source}; "
                         "rerun the base stage")
    if info.source == "local":
        return BaseRef(info.name_or_path, None, "local")
    return BaseRef(info.name_or_path, info.revision, "hub")


def model_folder(ref: BaseRef) -> Path:
    """A local folder holding the model: the HF cache first, then a download."""
    if not ref.is_hub:
        folder = Path(ref.name_or_path)
        if not folder.is_dir():
            raise ModelError(f"base model folder {folder} does not exist")
        return folder
    try:
        return snapshot(ref.name_or_path, ref.revision, local_only=True)
    except ModelError:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise
        return snapshot(ref.name_or_path, ref.revision, local_only=False)


def load_tokenizer(folder: str | Path):
    """The base model's tokenizer, with a pad token that is never EOS.

    The earlier attempt padded with EOS and masked pad ids out of the loss,
    which masked every real EOS too. Labels here never come from pad ids, but
    a pad distinct from EOS (LLaMA's <unk>) keeps that trap closed for anyone
    who reuses the tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except hub_errors(RuntimeError) as exc:  # sentencepiece raises RuntimeError for a damaged model file
        raise ModelError(f"{folder}: tokenizer could not be loaded: {type(exc).__name__}: {exc}") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ModelError(f"{folder}: tokenizer has no BOS or EOS token; a LLaMA-family tokenizer is expected")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise ModelError(f"{folder}: tokenizer has no pad or unk token distinct from EOS to pad with")
        tokenizer.pad_token = tokenizer.unk_token
    # Right padding for training and loss: with left padding and no explicit
    # position ids, every real token would sit at a shifted position. Generation
    # builds its own left-padded batches (generation.py).
    tokenizer.padding_side = "right"
    return tokenizer


def pick_device(requested: str, key: str = "device") -> str:
    """`key` is the params key that asked, so the error names it."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda was asked for but no CUDA GPU is visible; set it to auto or cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(precision: str, device: str):
    """bf16 where the GPU has it, fp16 (with loss scaling in training) where not, fp32 on CPU."""
    import torch

    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def disable_cpu_repack(model) -> int:
    """Keep bitsandbytes' 4-bit layers trainable on CPU after an eval pass.

    On CPU, the first eval-mode no-grad forward repacks 4-bit weights for an
    inference kernel that has no autograd; every later backward gives zero
    LoRA gradients, silently. Turning the repack off on each layer avoids it.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_model(folder: str | Path, *, quantization: str, double_quant: bool, dtype, device: str,
               attn_implementation: str = "sdpa"):
    """The base model for training or evaluation, 4-bit NF4 when asked."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True,
                              "attn_implementation": attn_implementation}
    if quantization == "nf4":
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["dtype"] = compute
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except hub_errors(RuntimeError, SafetensorError) as exc:  # RuntimeError: shapes that do not fit
        raise ModelError(f"{folder}: base model could not be loaded: {type(exc).__name__}: {exc}") from None
    log.info("base model loaded (%s) on %s in %.1f s", "4-bit NF4" if quantization == "nf4" else kwargs["dtype"],
             device, time.perf_counter() - start)
    if quantization == "nf4" and device == "cpu":
        disable_cpu_repack(model)
    return model


def linear_layer_names(model) -> set[str]:
    """Short names (q_proj, ...) of the linear layers LoRA can target."""
    import bitsandbytes as bnb
    import torch

    names = set()
    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit)
    for name, module in model.named_modules():
        if isinstance(module, linear_types) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def check_target_modules(model, targets: list[str]) -> None:
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"train.lora.target_modules: {', '.join(missing)} not in the model; "
            f"its linear layers are {', '.join(sorted(available))}"
        )


def model_context_length(folder: str | Path) -> int | None:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return config.get("max_position_embeddings")


def load_base(base_dir: str | Path, device: str, *, quantization: str, double_quant: bool, precision: str):
    """Tokenizer and the base model alone, loaded as training loads it with these train.* settings:
    the base's results then need no adapter, and stay valid while only the adapter changes."""
    folder = model_folder(resolve_base(base_dir))
    tokenizer = load_tokenizer(folder)
    base = load_model(folder, quantization=quantization, double_quant=double_quant,
                      dtype=pick_dtype(precision, device), device=device)
    return tokenizer, base


def load_tuned(base_dir: str | Path, adapter_dir: str | Path, device: str):
    """Tokenizer and a PeftModel on the base, loaded the way training loaded it."""
    from peft import PeftModel
    from safetensors import SafetensorError

    meta = TrainMeta.read(adapter_dir)
    tokenizer, base = load_base(base_dir, device, quantization=meta.quantization,
                                double_quant=meta.double_quant, precision=meta.precision)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except hub_errors(RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        # KeyError/TypeError: an adapter_config.json with missing or unknown fields
        raise ModelError(
            f"{adapter_dir}: not a loadable PEFT adapter for this base model: {type(exc).__name__}: {exc}"
        ) from None
    return tokenizer, model
