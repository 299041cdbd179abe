"""GGUF export: one file llama.cpp loads, holding the merged model, its tokenizer and the chat template;
llama.cpp asked through it answers like the merged model (checked where llama-cpp-python is installed)."""

from __future__ import annotations

import json

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'sabia-ift[gguf]')")

from conftest import REPO  # noqa: E402
from sabia_ift.errors import ConfigError, ModelError  # noqa: E402
from sabia_ift.serve import gguf_file  # noqa: E402
from sabia_ift.serve.export import export  # noqa: E402

NO_PROJECT = {"params": None, "manifest": None, "metrics_dir": None}
LLAMA_CPP_MISSING = gguf_file.llama_cpp_missing()
needs_llama_cpp = pytest.mark.skipif(LLAMA_CPP_MISSING is not None, reason=f"checked with llama.cpp only where it "
                                     f"is installed: {LLAMA_CPP_MISSING}")


@pytest.fixture(scope="module")
def held_out(tuned_adapter):
    return tuned_adapter.parent / "test.jsonl"


@pytest.fixture(scope="module")
def f16(tiny_base, tuned_adapter, held_out, tmp_path_factory):
    """`export --merged OUT --gguf f16 PATH`: the merged folder and the file written from it, with the log."""
    root = tmp_path_factory.mktemp("gguf-f16")
    log: list[str] = []
    export(tiny_base, tuned_adapter, merged=root / "merged", push_to=None, device="cpu", prompts=held_out,
           check_prompts=16, gguf=("f16", root / "model.f16.gguf"), log=log.append, **NO_PROJECT)
    return root / "merged", root / "model.f16.gguf", log


@pytest.fixture(scope="module")
def q8(tiny_base, tuned_adapter, held_out, tmp_path_factory):
    """`export --gguf q8_0 PATH` alone: the merge happens in a temporary folder beside the file."""
    root = tmp_path_factory.mktemp("gguf-q8")
    log: list[str] = []
    export(tiny_base, tuned_adapter, merged=None, push_to=None, device="cpu", prompts=held_out, check_prompts=16,
           gguf=("q8_0", root / "out" / "model.q8_0.gguf"), log=log.append, **NO_PROJECT)
    return root / "out" / "model.q8_0.gguf", log


def field(reader, key):
    found = reader.fields[key]
    values = [found.parts[i] for i in found.data]
    if found.types[0] == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode()
    if found.types[0] == gguf.GGUFValueType.ARRAY:
        if found.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode() for v in values]
        return [v.tolist()[0] for v in values]
    return values[0].tolist()[0]


# --- What the file holds (pure Python: runs everywhere) -----------------------------------------


def test_metadata_is_llamas_with_the_models_shape(f16, tiny_base):
    reader = gguf.GGUFReader(str(f16[1]))
    config = json.loads((tiny_base / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expected = {"llama.context_length": config["max_position_embeddings"], "llama.block_count": 2,
                "llama.embedding_length": 128, "llama.feed_forward_length": 384,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
                "llama.rope.dimension_count": 32, "llama.vocab_size": 32000}
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])


def test_tensors_have_llama_cpp_names_shapes_and_types(f16, q8):
    for path, matrix_type in ((f16[1], "F16"), (q8[0], "Q8_0")):
        tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down"]
        expected = {"token_embd.weight", "output_norm.weight", "output.weight",
                    *(f"blk.{i}.{name}.weight" for i in range(2) for name in per_block)}
        assert set(tensors) == expected
        # GGUF lists dimensions innermost first.
        assert tensors["token_embd.weight"].shape.tolist() == [128, 32000]
        assert tensors["blk.1.ffn_down.weight"].shape.tolist() == [384, 128]
        assert {t.tensor_type.name for n, t in tensors.items() if "norm" in n} == {"F32"}
        assert {t.tensor_type.name for n, t in tensors.items() if "norm" not in n} == {matrix_type}


def test_weights_are_the_merged_models_with_q_and_k_in_rotation_pair_order(f16):
    import torch
    from safetensors.torch import load_file

    merged, path, _ = f16
    weights = load_file(str(merged / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def stored(name):
        return torch.from_numpy(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).copy()).float()

    q = weights["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(stored("blk.1.attn_q.weight"), gguf_file.pair_order(q, 4).half().float())
    assert not torch.equal(stored("blk.1.attn_q.weight"), q.half().float())  # the reordering is not a no-op
    assert torch.equal(stored("blk.0.attn_k.weight"),
                       gguf_file.pair_order(weights["model.layers.0.self_attn.k_proj.weight"], 4).half().float())
    assert torch.equal(stored("blk.0.attn_v.weight"), weights["model.layers.0.self_attn.v_proj.weight"].half().float())
    assert torch.equal(stored("output.weight"), weights["lm_head.weight"].half().float())
    assert torch.equal(stored("output_norm.weight"), weights["model.norm.weight"])


def test_pair_order_turns_hf_rotary_into_adjacent_pair_rotary():
    """Attention scores are the same: HF's half-split rotation on the HF weights, and llama.cpp's adjacent-pair
    rotation on the reordered weights. Query and key sit at different positions: at one position any rotation
    cancels in the dot product, and the scores could not tell the two layouts apart."""
    import torch

    torch.manual_seed(0)
    heads, dim, hidden = 2, 8, 16
    wq, wk, x = torch.randn(heads * dim, hidden), torch.randn(heads * dim, hidden), torch.randn(2, hidden)
    query_at, key_at = 7, 2

    def angles(position):
        return position * 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)

    def hf_rope(v, position):  # transformers' rotate_half convention: row i turns with row i + dim/2
        v, a = v.view(heads, dim), angles(position)
        cos, sin = torch.cat([a.cos()] * 2), torch.cat([a.sin()] * 2)
        return v * cos + torch.cat([-v[..., dim // 2:], v[..., :dim // 2]], -1) * sin

    def pair_rope(v, position):  # llama.cpp's LLaMA rope: rows 2i and 2i+1 turn together
        v, a = v.view(heads, dim // 2, 2), angles(position)
        even, odd = v[..., 0], v[..., 1]
        return torch.stack([even * a.cos() - odd * a.sin(), even * a.sin() + odd * a.cos()], -1).flatten(1)

    def scores(rope, q_weight, k_weight):
        return torch.einsum("hd,hd->h", rope(x[0] @ q_weight.T, query_at), rope(x[1] @ k_weight.T, key_at))

    hf = scores(hf_rope, wq, wk)
    torch.testing.assert_close(scores(pair_rope, gguf_file.pair_order(wq, heads), gguf_file.pair_order(wk, heads)),
                               hf)
    assert not torch.allclose(scores(pair_rope, wq, wk), hf, rtol=1e-2, atol=1e-2)  # the reordering matters


def test_tokenizer_arrays_are_the_training_tokenizers(f16, tokenizer):
    from sabia_ift.template import chat_template

    reader = gguf.GGUFReader(str(f16[1]))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    assert (types[0], types[1], types[2]) == (T.UNKNOWN, T.CONTROL, T.CONTROL)
    assert types[tokens.index("<0x0A>")] == T.BYTE and types[tokens.index("▁t")] == T.NORMAL
    scores = field(reader, "tokenizer.ggml.scores")
    # The training tokenizer merges "▁" "▁" first, "▁" "t" soon after, "▁" "que" and "▁est" "á" much later:
    # the scores keep that order.
    ranked = [scores[tokens.index(piece)] for piece in ("▁▁", "▁t", "▁que", "▁está")]
    assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == 4
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    assert field(reader, "tokenizer.chat_template") == chat_template("")


def test_agreement_is_recorded_in_the_file(f16, q8):
    for path, log in ((f16[1], f16[2]), (q8[0], q8[1])):
        record = gguf_file.read_agreement(path)
        assert record["max_new_tokens"] == 128 and record["source"].endswith("test.jsonl")
        assert log[-1] == gguf_file.agreement_line(record)
        if LLAMA_CPP_MISSING is None:
            assert record["prompts"] == 16 and "agreeing" in record
        else:
            assert record["not_measured"] == LLAMA_CPP_MISSING
            assert "not measured (llama-cpp-python is not installed" in log[-1]


def test_temporary_merge_is_gone_and_the_file_has_normal_permissions(q8):
    import os

    path = q8[0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --- llama.cpp itself ------------------------------------------------------------------------------


@needs_llama_cpp
def test_llama_cpp_reads_every_bundled_prompt_as_the_training_ids(f16, tokenizer):
    from sabia_ift.template import build_prompt, chat_messages, chat_template, encode_prompt

    llm = gguf_file.LlamaCpp(f16[1], 512)
    rows = [json.loads(line) for line in (REPO / "data/sample/instructions.jsonl").read_text().splitlines()]
    wrong = [i + 1 for i, row in enumerate(rows)
             if llm.tokenize(tokenizer.apply_chat_template(
                 chat_messages(row["instruction"], row["input"]), chat_template=chat_template(""),
                 add_generation_prompt=True, tokenize=False))
             != encode_prompt(tokenizer, build_prompt(row["instruction"], row["input"]))]
    assert len(rows) == 1200 and wrong == []


@needs_llama_cpp
def test_llama_cpp_f16_answers_like_the_merged_model(f16):
    record = gguf_file.read_agreement(f16[1])
    assert record["prompt_ids_equal"] == record["prompts"] == 16
    assert record["agreeing"] == 16


@needs_llama_cpp
def test_agreement_can_fail(f16, held_out, tiny_base):
    """The base without the adapter, in place of the merged model, disagrees with the tuned file."""
    from sabia_ift.io import read_jsonl
    from sabia_ift.template import chat_template

    record = gguf_file.measure(f16[1], tiny_base, read_jsonl(held_out)[:4], chat_template(""), 32, "test", "f16")
    assert record["prompt_ids_equal"] == 4 and record["agreeing"] < 4


# --- Bad input: one line, nothing written ----------------------------------------------------------


def test_unknown_type_is_one_line(tiny_base, tuned_adapter, tmp_path, capsys):
    from sabia_ift.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tiny_base), "--adapter", str(tuned_adapter), "--gguf", "q4_k", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --gguf q4_k: unknown GGUF type; choose f16 or q8_0 (f16: the merged weights in half " \
                  "precision; q8_0: 8-bit, about half the size)\n"
    assert not out.exists()


def test_existing_file_needs_overwrite_and_is_replaced_only_whole(tiny_base, tuned_adapter, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    with pytest.raises(ConfigError, match=r"^--gguf .*m\.gguf: exists; nothing is deleted that this command did "
                                          r"not write: choose a new path, or pass --overwrite"):
        export(tiny_base, tuned_adapter, merged=None, push_to=None, device="cpu", check_prompts=0,
               gguf=("f16", out), log=lambda _: None, **NO_PROJECT)
    assert out.read_text() == "mine"

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        export(tiny_base, tuned_adapter, merged=None, push_to=None, device="cpu", check_prompts=0, overwrite=True,
               gguf=("f16", out), log=lambda _: None, **NO_PROJECT)
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export(tiny_base, tuned_adapter, merged=None, push_to=None, device="cpu", check_prompts=0, overwrite=True,
           gguf=("f16", out), log=lambda _: None, **NO_PROJECT)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: (p / "m.gguf").mkdir(), r"is a folder; give the path of the file to write"),
    (lambda p: None, r"refused, even with --overwrite: it is inside .*the adapter it reads"),
])
def test_destinations_that_are_not_new_files_are_refused(tiny_base, tuned_adapter, tmp_path, make, message):
    make(tmp_path)
    out = tmp_path / "m.gguf" if "folder" in message else tuned_adapter / "m.gguf"
    with pytest.raises(ConfigError, match=message):
        export(tiny_base, tuned_adapter, merged=None, push_to=None, device="cpu", check_prompts=0, overwrite=True,
               gguf=("f16", out), log=lambda _: None, **NO_PROJECT)
    assert not (tuned_adapter / "m.gguf").exists()


def test_a_base_that_is_not_llama_is_refused(tiny_base, tokenizer, tmp_path):
    import shutil

    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                    "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ModelError, match=r"config\.json: model_type 'mistral' \(MistralForCausalLM\): --gguf writes "
                                         r"LLaMA-architecture models only"):
        gguf_file.write_gguf(folder, tmp_path / "m.gguf", "f16", chat_template="", tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()
