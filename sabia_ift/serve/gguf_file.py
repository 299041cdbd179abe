"""`sabia-ift export --gguf TYPE PATH`: the merged model as one GGUF file for llama.cpp and Ollama.

The file is written with the llama.cpp project's own `gguf` package (its
writer, tensor-name map and Q8_0 quantiser), from a merged model folder
(base + adapter, as `export --merged` writes it). Three conventions make it
answer like the merged model:

- llama.cpp's LLaMA rotary embedding rotates adjacent pairs of each head,
  while Hugging Face LLaMA weights have their q and k rows reordered so that
  rotation pairs lie half a head apart. The q and k rows are put back in
  pair order, head by head (k with the key/value head count).
- The vocabulary is llama.cpp's "llama" (sentencepiece-style) tokenizer fed
  from the tokenizer the model was trained with: its tokenizer.json's BPE
  merges become scores (an earlier merge scores higher), so llama.cpp merges
  pieces in the order the training tokenizer does. A byte-level BPE
  tokenizer is written as "gpt2" with its merges; a folder holding only a
  sentencepiece model is read with sentencepiece.
- The chat template renders `<s>` + the training prompt; llama.cpp's tokenizer
  puts the word-start mark after `<s>` itself, so the prompt gets exactly the
  training ids (tests/test_gguf_file.py checks this with llama.cpp).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..destination import new_folder
from ..errors import ConfigError, ModelError

GGUF_TYPES = ("f16", "q8_0")
# Where the export records how often the file's greedy answers equal the merged model's; patched in place
# after the measurement, so the value is written padded to a fixed length first.
AGREEMENT_KEY = "sabia_ift.agreement"
AGREEMENT_BYTES = 512
ARCHITECTURE = "llama"


def check_type(name: str) -> None:
    if name not in GGUF_TYPES:
        raise ConfigError(f"--gguf {name}: unknown GGUF type; choose {' or '.join(GGUF_TYPES)} "
                          "(f16: the merged weights in half precision; q8_0: 8-bit, about half the size)")


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("--gguf needs the gguf package: pip install 'sabia-ift[gguf]'") from None
    return gguf


# --- Architecture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """What llama.cpp's LLaMA graph needs to know of the model, from config.json."""

    vocab_size: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tied_embeddings: bool

    @classmethod
    def read(cls, folder: Path) -> LlamaShape:
        path = folder / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read the merged model's config ({exc})") from None
        kind = config.get("model_type")
        architectures = config.get("architectures") or []
        if kind != "llama" or architectures not in ([], ["LlamaForCausalLM"]):
            raise ModelError(f"{path}: model_type {kind!r} ({', '.join(architectures) or 'no architectures'}): "
                             "--gguf writes LLaMA-architecture models only (LlamaForCausalLM)")
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // heads
        # transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta/rope_scaling.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ModelError(f"{path}: rope type {rope_type!r}: --gguf writes default or linear rope scaling only")
        if head_dim * heads != hidden:
            raise ModelError(f"{path}: head_dim {head_dim} × {heads} heads is not hidden_size {hidden}; "
                             "llama.cpp's LLaMA graph needs them equal")
        return cls(
            vocab_size=config["vocab_size"],
            context_length=config["max_position_embeddings"],
            embedding_length=hidden,
            feed_forward_length=config["intermediate_size"],
            block_count=config["num_hidden_layers"],
            head_count=heads,
            head_count_kv=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_linear_factor=float(rope["factor"]) if rope_type == "linear" else None,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def pair_order(weight, heads: int):
    """q or k rows of each head reordered from Hugging Face's half-split rotary layout to adjacent pairs.

    In a head of d rows, HF's row i (i < d/2) rotates with row i + d/2;
    llama.cpp's LLaMA rope rotates rows 2i and 2i+1. Row i goes to 2i, row
    i + d/2 to 2i + 1.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# --- Tokenizer ---------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    model: str  # "llama" or "gpt2"
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)


def _merge_strings(merges: list[Any]) -> list[str]:
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer).
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def vocabulary(folder: Path, tokenizer) -> Vocabulary:
    """llama.cpp's view of the tokenizer in `folder` (tokenizer.json, else tokenizer.model)."""
    gguf = require_gguf()
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            spm = gguf.SentencePieceVocab(folder)
            pieces, piece_scores, piece_types = zip(*spm.all_tokens(), strict=True)
            return Vocabulary("llama", [p.decode("utf-8") for p in pieces], list(piece_scores),
                              [int(t) for t in piece_types])
        raise ModelError(f"{folder}: no tokenizer.json or tokenizer.model to write into the GGUF file")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"{path}: a {model.get('type')} tokenizer: --gguf writes BPE tokenizers (LLaMA "
                         "sentencepiece-style or byte-level)")
    by_id = {index: text for text, index in model["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    size = len(tokenizer)
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise ModelError(f"{path}: token ids {missing[:5]} have no text; the vocabulary must be contiguous")
    tokens = [by_id[i] for i in range(size)]
    merges = _merge_strings(model.get("merges") or [])
    T = gguf.TokenType

    def kind(index: int, text: str) -> int:
        if index == tokenizer.unk_token_id:
            return T.UNKNOWN
        if index in added:
            return T.CONTROL if added[index].get("special") else T.USER_DEFINED
        if byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return T.BYTE
        return T.NORMAL

    byte_fallback = bool(model.get("byte_fallback"))
    types = [int(kind(i, t)) for i, t in enumerate(tokens)]
    if not byte_fallback:
        return Vocabulary("gpt2", tokens, [0.0] * size, types, merges)
    # llama.cpp's "llama" tokenizer merges the adjacent pair whose joined piece scores highest; the training
    # tokenizer merges the pair listed first. A piece scores minus the rank of the first merge that makes
    # it; a piece no merge makes (single characters, bytes, specials) is never a merge result in either.
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), rank)
    scores = [-float(first[t]) if t in first else (0.0 if len(t) <= 1 or types[i] != T.NORMAL else -1e9)
              for i, t in enumerate(tokens)]
    return Vocabulary("llama", tokens, scores, types)


def chat_template_for_gguf(folder: Path, tokenizer) -> str:
    """The chat template llama.cpp renders: for a "llama" vocabulary `<s>` + the prompt with nothing between,
    since llama.cpp marks the word start after a special token itself; otherwise the exported tokenizer's."""
    from ..template import chat_template, chat_template_for

    return chat_template("") if vocabulary(folder, tokenizer).model == "llama" else chat_template_for(tokenizer)


# --- Writing -----------------------------------------------------------------------------------


def _safetensors(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no .safetensors weights to write into the GGUF file")
    return files


def _tensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """Every weight of the merged model, one at a time, as float32 numpy arrays."""
    from safetensors import safe_open

    for path in _safetensors(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name).float().numpy()


def _shapes(folder: Path) -> Iterator[tuple[str, list[int]]]:
    from safetensors import safe_open

    for path in _safetensors(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                yield name, list(f.get_slice(name).get_shape())


def _storage(name: str, shape: list[int], kind: str):
    """The GGML type a tensor is stored in: 1-D tensors (norms) stay F32, as llama.cpp's converter keeps them."""
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32
    if kind == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def write_gguf(folder: str | Path, out: str | Path, kind: str, *, chat_template: str, tokenizer,
               name: str = "sabia-ift", description: str = "",
               measure: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write the merged model in `folder` as one GGUF file at `out` (atomically: whole or not at all).

    Tensors are converted and written one at a time, so memory holds one
    weight matrix, not the model. `measure`, given the finished temporary
    file, returns the agreement record written into it before it is renamed
    into place.
    """
    gguf = require_gguf()
    check_type(kind)
    folder, out = Path(folder), Path(out)
    shape = LlamaShape.read(folder)
    vocab = vocabulary(folder, tokenizer)
    if len(vocab.tokens) != shape.vocab_size:
        raise ModelError(f"{folder}: the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
                         f"{shape.vocab_size}; llama.cpp needs them equal")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.block_count)
    plan = []
    for hf_name, dims in _shapes(folder):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{folder}: tensor {hf_name} has no llama.cpp name; is this a plain LLaMA model?")
        plan.append((hf_name, gguf_name, dims, _storage(gguf_name, dims, kind)))
    with new_folder(out, is_dir=False) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
        writer.add_name(name)
        if description:
            writer.add_description(description)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(shape.vocab_size)
        writer.add_context_length(shape.context_length)
        writer.add_embedding_length(shape.embedding_length)
        writer.add_feed_forward_length(shape.feed_forward_length)
        writer.add_block_count(shape.block_count)
        writer.add_head_count(shape.head_count)
        writer.add_head_count_kv(shape.head_count_kv)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(shape.rope_theta)
        if shape.rope_linear_factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(shape.rope_linear_factor)
        writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
        writer.add_tokenizer_model(vocab.model)
        if vocab.model == "gpt2":
            writer.add_tokenizer_pre("default")
            writer.add_token_merges(vocab.merges)
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        if tokenizer.unk_token_id is not None:
            writer.add_unk_token_id(tokenizer.unk_token_id)
        if tokenizer.pad_token_id is not None:
            writer.add_pad_token_id(tokenizer.pad_token_id)
        # Training rows begin with BOS and never end in an added EOS; llama.cpp strips the template's
        # leading <s> when it adds BOS itself, so the prompt carries exactly one.
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if vocab.model == "llama":
            writer.add_add_space_prefix(True)
        writer.add_chat_template(chat_template)
        writer.add_string(AGREEMENT_KEY, _padded("not measured"))
        for _, gguf_name, dims, storage in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(dims, storage) if storage == gguf.GGMLQuantizationType.Q8_0 \
                else dims
            itemsize = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(storage, 1)
            nbytes = itemsize * _product(byte_shape)
            dtype = {gguf.GGMLQuantizationType.F32: "float32", gguf.GGMLQuantizationType.F16: "float16"}.get(
                storage, "uint8")
            import numpy as np

            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(dtype), nbytes,
                                   raw_dtype=storage if dtype == "uint8" else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (hf_name, gguf_name, _, storage), (read_name, data) in zip(plan, _planned(folder, plan), strict=True):
            assert hf_name == read_name
            if gguf_name.endswith("attn_q.weight"):
                data = pair_order(data, shape.head_count)
            elif gguf_name.endswith("attn_k.weight"):
                data = pair_order(data, shape.head_count_kv)
            writer.write_tensor_data(gguf.quants.quantize(data, storage))
        writer.close()
        if measure is not None:
            record_agreement(tmp, measure(tmp))
    return out


def _planned(folder: Path, plan: list) -> Iterator[tuple[str, Any]]:
    wanted = {hf_name for hf_name, *_ in plan}
    return ((n, t) for n, t in _tensors(folder) if n in wanted)


def _product(dims: list[int]) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _padded(text: str) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) > AGREEMENT_BYTES:
        raise ValueError(f"agreement record longer than {AGREEMENT_BYTES} bytes")
    return text + " " * (AGREEMENT_BYTES - len(encoded))


def record_agreement(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` (JSON) into the file's agreement field, in place: the field keeps its length."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    found = reader.fields[AGREEMENT_KEY]
    # A string field: key length (u64), key, value type (u32), string length (u64), then the text.
    offset = found.offset + 8 + len(AGREEMENT_KEY.encode()) + 4 + 8
    del reader
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(_padded(json.dumps(record, ensure_ascii=False)).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_agreement(path: str | Path) -> dict[str, Any] | str:
    gguf = require_gguf()
    text = _field_text(gguf.GGUFReader(str(path)), AGREEMENT_KEY).strip()
    return json.loads(text) if text.startswith("{") else text


def _field_text(reader, key: str) -> str:
    found = reader.fields[key]
    return bytes(found.parts[found.data[0]]).decode("utf-8")


# --- Checking the file with llama.cpp -----------------------------------------------------------


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot be asked here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'sabia-ift[gguf-check]')"
    return None


@dataclass
class LlamaCpp:
    """A GGUF file loaded in llama.cpp, asked greedily from token ids."""

    path: Path
    context: int

    def __post_init__(self) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(self.path), n_ctx=self.context, n_threads=1, n_batch=self.context,
                         seed=0, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        """`text` as llama.cpp reads a rendered chat prompt: special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Up to `max_new_tokens` greedy ids after `ids`, stopping before EOS."""
        eos = self.llm.token_eos()
        out: list[int] = []
        for next_id in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                         reset=True):
            if next_id == eos or len(out) == max_new_tokens:
                break
            out.append(next_id)
        return out


def hf_greedy(model, ids: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """The merged model's greedy ids after `ids` (transformers), stopping before EOS."""
    import torch

    with torch.no_grad():
        output = model.generate(torch.tensor([ids], device=model.device), attention_mask=None,
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                pad_token_id=eos)
    new = output[0, len(ids):].tolist()
    return new[:new.index(eos)] if eos in new else new


def measure(gguf_path: Path, merged_folder: Path, rows: list[dict[str, Any]], chat_template: str,
            max_new_tokens: int, source: str, kind: str) -> dict[str, Any]:
    """Greedy ids of the GGUF file in llama.cpp against the merged model's in transformers, prompt for prompt.

    llama.cpp gets the prompt as a user of the file does (the file's chat
    template rendered, then tokenized by llama.cpp); the merged model gets the
    training ids. So a prompt agrees only if both the tokenization and every
    answer token agree.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..template import build_prompt, chat_messages, encode_prompt

    record: dict[str, Any] = {"type": kind, "source": source, "max_new_tokens": max_new_tokens}
    why = llama_cpp_missing()
    if why is not None or not rows:
        return {**record, "not_measured": why or "no test prompts"}
    import llama_cpp

    tokenizer = AutoTokenizer.from_pretrained(str(merged_folder))
    model = AutoModelForCausalLM.from_pretrained(str(merged_folder), dtype="auto")
    prompts = [(encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input") or "")),
                tokenizer.apply_chat_template(chat_messages(r["instruction"], r.get("input") or ""),
                                              chat_template=chat_template, add_generation_prompt=True,
                                              tokenize=False)) for r in rows]
    context = max(len(ids) for ids, _ in prompts) + max_new_tokens + 1
    llm = LlamaCpp(gguf_path, context)
    same_prompt = agreeing = 0
    for ids, text in prompts:
        asked = llm.tokenize(str(text))
        expected = hf_greedy(model, ids, tokenizer.eos_token_id, max_new_tokens)
        got = llm.greedy(asked, max_new_tokens)
        same_prompt += asked == ids
        agreeing += asked == ids and got == expected
    del llm, model
    return {**record, "prompts": len(rows), "prompt_ids_equal": same_prompt, "agreeing": agreeing,
            "share": round(agreeing / len(rows), 4),
            "reference": f"merged model, transformers, {_dtype(merged_folder)}",
            "llama_cpp_python": llama_cpp.__version__}


def _dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def agreement_line(record: dict[str, Any] | str) -> str:
    if isinstance(record, str) or "agreeing" not in record:
        why = record if isinstance(record, str) else record.get("not_measured", "not measured")
        return f"greedy agreement with the merged model: not measured ({why})"
    return (f"{record['agreeing']} of {record['prompts']} greedy answers of llama.cpp on the {record['type']} file "
            f"equal the merged model's ({record['share']:.0%}; prompt ids equal on {record['prompt_ids_equal']}; "
            f"test prompts of {record['source']}, at most {record['max_new_tokens']} new tokens)")
