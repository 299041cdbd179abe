"""Loss labels: prompt masked, response and the real EOS trained, lengths within max."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import params_for
from sabia_ift.data.tokenization import build_example, tokenize, tokenize_split
from sabia_ift.errors import ConfigError
from sabia_ift.template import IGNORE_INDEX, build_prompt, encode_prompt


def row(instruction, output, input_=""):
    return {"prompt": build_prompt(instruction, input_), "response": output}


def check_invariants(tokenizer, example, prompt_ids, max_length, truncated=False):
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) <= max_length
    assert ids[0] == tokenizer.bos_token_id
    n_prompt = len(prompt_ids)
    assert ids[:n_prompt] == prompt_ids
    # BOS and every prompt token carry no loss.
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    # Every response token is trained on its own id.
    assert labels[n_prompt:] == ids[n_prompt:]
    if not truncated:
        assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
        assert ids.count(tokenizer.eos_token_id) == 1


def test_example_layout(tokenizer):
    examples, counts = tokenize_split(tokenizer, [row("Qual é a capital do Ceará?", "A capital é Fortaleza.")],
                                      params_for("tokenize", max_length=256))
    ex = {"input_ids": examples["input_ids"][0], "labels": examples["labels"][0]}
    prompt_ids = encode_prompt(tokenizer, build_prompt("Qual é a capital do Ceará?"))
    check_invariants(tokenizer, ex, prompt_ids, 256)
    response = tokenizer.decode(ex["input_ids"][len(prompt_ids):-1])
    assert response == "A capital é Fortaleza."
    assert counts["trained_tokens"] == len(ex["input_ids"]) - len(prompt_ids)
    assert counts["boundary_fallback"] == 0


def test_eos_label_survives_dynamic_padding(tokenizer):
    """The earlier attempt's bug: pad == eos and pads masked to -100 also masked the real EOS."""
    from transformers import DataCollatorForSeq2Seq

    rows = [row("Diga sim.", "Sim."), row("Conte até cinco.", "Um, dois, três, quatro, cinco.")]
    examples, _ = tokenize_split(tokenizer, rows, params_for("tokenize"))
    features = [{"input_ids": ids, "labels": labels} for ids, labels in zip(examples["input_ids"], examples["labels"])]
    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(features)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = int(mask.sum())
        assert labels[real - 1] == tokenizer.eos_token_id  # the last real token is a trained EOS
        assert (labels[real:] == IGNORE_INDEX).all()
        assert (ids[real:] == tokenizer.pad_token_id).all()
    # What the buggy recipe does, for contrast: with pad == eos, masking pads kills every EOS label.
    buggy = batch["input_ids"].clone()
    buggy[batch["attention_mask"] == 0] = tokenizer.eos_token_id
    buggy_labels = buggy.masked_fill(buggy == tokenizer.eos_token_id, IGNORE_INDEX)
    assert not (buggy_labels == tokenizer.eos_token_id).any()


@pytest.mark.parametrize("overlength", ["drop", "truncate"])
def test_overlength_policy_is_counted(tokenizer, overlength):
    long_output = "palavra " * 200
    rows = [row("Curta.", "Sim."), row("Longa.", long_output)]
    cfg = params_for("tokenize", max_length=96, overlength=overlength)
    examples, counts = tokenize_split(tokenizer, rows, cfg)
    assert counts["rows_in"] == 2
    if overlength == "drop":
        assert counts["rows"] == 1 and counts["dropped_too_long"] == 1 and counts["truncated"] == 0
    else:
        assert counts["rows"] == 2 and counts["truncated"] == 1
        ids, labels = examples["input_ids"][1], examples["labels"][1]
        assert len(ids) == 96
        assert tokenizer.eos_token_id not in ids  # no stop is taught mid-sentence
        assert labels[-1] == ids[-1] != IGNORE_INDEX


def test_prompt_longer_than_max_is_always_dropped(tokenizer):
    cfg = params_for("tokenize", max_length=32, overlength="truncate")
    _, counts = tokenize_split(tokenizer, [row("muito " * 100, "ok")], cfg)
    assert counts["rows"] == 0 and counts["dropped_prompt_too_long"] == 1


def test_max_length_above_context_is_refused(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="tokenize.max_length: 4096 is above the base model's context of 2048"):
        tokenize(params_for("tokenize", max_length=4096), tokenizer, 2048, tmp_path, tmp_path / "out")


def test_build_example_exact_arithmetic():
    example, status = build_example([10, 11], [20, 21, 22], bos=1, eos=2, max_length=8, overlength="drop")
    assert status == "ok"
    assert example == {"input_ids": [1, 10, 11, 20, 21, 22, 2], "labels": [-100, -100, -100, 20, 21, 22, 2]}
    example, status = build_example([10, 11], [20, 21, 22], bos=1, eos=2, max_length=5, overlength="truncate")
    assert status == "truncated" and example["input_ids"] == [1, 10, 11, 20, 21]


def test_tokenize_stage_writes_arrow_and_counts(tokenizer, tmp_path):
    import datasets

    formatted = tmp_path / "formatted"
    formatted.mkdir()
    for split, n in (("train", 5), ("val", 2), ("test", 2)):
        with (formatted / f"{split}.jsonl").open("w") as fh:
            for i in range(n):
                fh.write(json.dumps(row(f"Pergunta {i}?", f"Resposta número {i}.")) + "\n")
    metrics = tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, formatted, tmp_path / "tok")
    data = datasets.load_from_disk(str(tmp_path / "tok"))
    assert {k: len(v) for k, v in data.items()} == {"train": 5, "validation": 2, "test": 2}
    assert metrics["train"]["rows"] == 5 and metrics["train"]["length"]["max"] <= 128
    assert not list(tmp_path.glob(".tok.tmp-*"))


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=text.filter(str.strip), input_=text, output=text.filter(str.strip),
       max_length=st.integers(min_value=16, max_value=160), overlength=st.sampled_from(["drop", "truncate"]))
def test_label_invariants_hold_for_any_row(tokenizer, instruction, input_, output, max_length, overlength):
    r = row(instruction, output, input_)
    cfg = params_for("tokenize", max_length=max_length, overlength=overlength)
    examples, counts = tokenize_split(tokenizer, [r], cfg)
    assert counts["rows"] + counts["dropped_too_long"] + counts["dropped_prompt_too_long"] == 1
    if counts["rows"]:
        ex = {"input_ids": examples["input_ids"][0], "labels": examples["labels"][0]}
        prompt_ids = encode_prompt(tokenizer, r["prompt"])
        if counts["boundary_fallback"] == 0:
            check_invariants(tokenizer, ex, prompt_ids, max_length, truncated=bool(counts["truncated"]))
        assert any(label != IGNORE_INDEX for label in ex["labels"])


def test_special_token_strings_are_text_not_tokens(tokenizer):
    """The issue's HTML row: one BOS, first; one EOS label, last."""
    r = row("Explique a tag <s> do HTML.", "A tag <s>texto</s> mostra o texto riscado.")
    examples, counts = tokenize_split(tokenizer, [r], params_for("tokenize", max_length=256))
    ids, labels = examples["input_ids"][0], examples["labels"][0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids.count(eos) == 1 and ids[-1] == eos
    assert [label for label in labels if label == eos] == [eos] and labels[-1] == eos
    assert tokenizer.unk_token_id not in ids
    prompt_length = examples["prompt_length"][0]
    assert ids[:prompt_length] == encode_prompt(tokenizer, r["prompt"])
    assert tokenizer.decode(ids[prompt_length:-1]) == r["response"]
    assert counts["boundary_fallback"] == 0


def test_examples_remember_their_row(tokenizer):
    rows = [{**row("Curta?", "Sim."), "source_row": 7}, {**row("Longa?", "palavra " * 200), "source_row": 9},
            {**row("Outra?", "Não."), "source_row": 12}]
    examples, counts = tokenize_split(tokenizer, rows, params_for("tokenize", max_length=96, max_drop_share=1))
    assert examples["source_row"] == [7, 12]
    for _ids, labels, n in zip(examples["input_ids"], examples["labels"], examples["prompt_length"]):
        assert labels[:n] == [IGNORE_INDEX] * n and labels[n] != IGNORE_INDEX
    assert (counts["dropped"], counts["drop_share"]) == (1, 0.3333)


def write_formatted(folder, sizes, long_every=0):
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for split, size in sizes.items():
        with (folder / f"{split}.jsonl").open("w") as fh:
            for i in range(size):
                n += 1
                output = "palavra " * 300 if long_every and n % long_every == 0 else f"Resposta número {i}."
                fh.write(json.dumps({**row(f"Pergunta {i}?", output), "source_row": n}) + "\n")


def test_drops_above_the_allowed_share_are_refused(tokenizer, tmp_path):
    write_formatted(tmp_path / "formatted", {"train": 10, "val": 5, "test": 5}, long_every=4)
    cfg = params_for("tokenize", max_length=128, max_drop_share=0.2)
    with pytest.raises(ConfigError) as info:
        tokenize(cfg, tokenizer, 2048, tmp_path / "formatted", tmp_path / "tok")
    message = str(info.value)
    assert "tokenize.max_drop_share: 5 of 20 rows (25.0%)" in message
    # Five rows of 300 words need far more than 128 tokens: 95% of rows fit only a max_length that holds them.
    keep = int(message.split("a tokenize.max_length of ")[1].split()[0])
    assert keep > 128
    assert not (tmp_path / "tok").exists()
    metrics = tokenize(params_for("tokenize", max_length=keep, max_drop_share=0.2), tokenizer, 2048,
                       tmp_path / "formatted", tmp_path / "tok")
    assert sum(metrics[s]["dropped"] for s in ("train", "val", "test")) <= 1
    metrics = tokenize(params_for("tokenize", max_length=128, max_drop_share=0.25), tokenizer, 2048,
                       tmp_path / "formatted", tmp_path / "tok")
    assert metrics["train"]["dropped"] == 2 and metrics["train"]["drop_share"] == 0.2


def test_stage_says_what_it_dropped(tokenizer, tmp_path):
    from sabia_ift.data.tokenization import summary

    write_formatted(tmp_path / "formatted", {"train": 10, "val": 4, "test": 4}, long_every=9)
    metrics = tokenize(params_for("tokenize", max_length=128, max_drop_share=0.5), tokenizer, 2048,
                       tmp_path / "formatted", tmp_path / "tok")
    assert summary(metrics) == ("tokenized: train 9 of 10 rows (1 dropped, 10.0%, too long for max_length 128); "
                                "val 4 of 4 rows; test 3 of 4 rows (1 dropped, 25.0%, too long for max_length 128)")


def test_contaminated_training_rows_are_left_out_and_counted(tokenizer, tmp_path):
    from sabia_ift.data.tokenization import summary

    write_formatted(tmp_path / "formatted", {"train": 10, "val": 4, "test": 4})
    # Row 12 is in val: the contamination stage's list drops training rows only.
    metrics = tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, tmp_path / "formatted",
                       tmp_path / "tok", contaminated={2, 5, 12})
    assert metrics["train"]["dropped_contaminated"] == 2 and metrics["train"]["rows"] == 8
    assert metrics["val"]["dropped_contaminated"] == 0 and metrics["val"]["rows"] == 4
    assert summary(metrics).startswith("tokenized: train 8 of 8 rows (2 more left out as contaminated)")


def test_empty_splits_are_left_out_and_load(tokenizer, tmp_path):
    """The pinned datasets writes no file for an empty split, and load_from_disk then fails."""
    from sabia_ift.artifacts import load_tokenized

    write_formatted(tmp_path / "formatted", {"train": 4, "val": 0, "test": 0})
    metrics = tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, tmp_path / "formatted",
                       tmp_path / "tok")
    assert metrics["val"]["rows"] == metrics["test"]["rows"] == 0
    data = load_tokenized(tmp_path / "tok")
    assert list(data) == ["train"] and len(data["train"]) == 4
    assert data.get("validation") is None


def test_no_training_row_left_is_refused(tokenizer, tmp_path):
    write_formatted(tmp_path / "formatted", {"train": 2, "val": 1, "test": 1}, long_every=1)
    with pytest.raises(ConfigError, match="train.jsonl: no training row fits tokenize.max_length 64"):
        tokenize(params_for("tokenize", max_length=64, max_drop_share=1), tokenizer, 2048, tmp_path / "formatted",
                 tmp_path / "tok")


# --- The stage streams: batches of examples, the prompt read from the whole text, Arrow as it goes ---


pieces = st.sampled_from(["a", "b", " ", "  ", "\n", "\t", "ã", "é", "\u0301", "<s>", "</s>", "<unk>", "▁",
                          "👩\u200d💻", "🙂", "中文", "\u00a0", "\ufeff", "\r\n", "12", "###", ":"])
raw = st.lists(pieces, min_size=1, max_size=12).map("".join) | text.filter(bool)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(raw, raw), min_size=1, max_size=6), template=st.booleans())
def test_prompt_ids_read_from_the_whole_text_are_the_prompts_own(tokenizer, pairs, template):
    """The shortcut (no second tokenization of the prompt) gives what tokenizing it alone gives."""
    from sabia_ift.data.tokenization import encode_pairs, heads_are_prompts

    assert heads_are_prompts(tokenizer)
    prompts = [build_prompt(p) if template else p for p, _ in pairs]
    responses = [r for _, r in pairs]
    assert encode_pairs(tokenizer, prompts, responses, True) == encode_pairs(tokenizer, prompts, responses, False)


def test_other_tokenizers_tokenize_the_prompt_alone(tokenizer):
    from types import SimpleNamespace

    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    from sabia_ift.data.tokenization import heads_are_prompts

    def variant(change):
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        change(backend)
        return SimpleNamespace(backend_tokenizer=backend)

    assert heads_are_prompts(variant(lambda b: None))
    assert heads_are_prompts(variant(lambda b: setattr(b, "normalizer", normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))))  # LLaMA's older conversion
    assert not heads_are_prompts(variant(lambda b: setattr(b, "normalizer", normalizers.NFC())))
    assert not heads_are_prompts(variant(lambda b: setattr(b, "normalizer", normalizers.Replace("ab", ""))))
    assert not heads_are_prompts(variant(lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel())))
    assert not heads_are_prompts(variant(lambda b: setattr(b.model, "dropout", 0.1)))
    assert not heads_are_prompts(SimpleNamespace())  # a slow tokenizer: no backend to inspect


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=12),
       max_length=st.integers(16, 70), overlength=st.sampled_from(["drop", "truncate"]))
def test_a_batch_of_examples_is_build_example_row_by_row(lengths, max_length, overlength):
    from sabia_ift.data.tokenization import _as_lists, _examples, _new_counts

    cfg = params_for("tokenize", max_length=max_length, overlength=overlength)
    ids = [[1000 + 100 * i + j for j in range(p + r)] for i, (p, r) in enumerate(lengths)]
    chunk = [{"source_row": 10 + i} for i in range(len(lengths))]
    counts, needed = _new_counts(), []
    got = _as_lists(_examples(chunk, (ids, [p for p, _ in lengths], 0), 0, cfg, 1, 2, counts, needed))
    want: dict[str, list] = {name: [] for name in got}
    statuses = []
    for i, (p, _) in enumerate(lengths):
        example, status = build_example(ids[i][:p], ids[i][p:], 1, 2, max_length, overlength)
        statuses.append(status)
        if example is not None:
            want["input_ids"].append(example["input_ids"])
            want["labels"].append(example["labels"])
            want["length"].append(len(example["input_ids"]))
            want["source_row"].append(10 + i)
            want["prompt_length"].append(1 + p)
    assert got == want
    assert counts["rows"] == len(want["length"]) and counts["rows_in"] == len(lengths)
    assert counts["tokens"] == sum(want["length"])
    assert counts["trained_tokens"] == sum(sum(t != IGNORE_INDEX for t in lab) for lab in want["labels"])
    for status in ("truncated", "too_long", "prompt_too_long"):
        key = status if status == "truncated" else f"dropped_{status}"
        assert counts[key] == statuses.count(status)
    assert needed == [p + r + 2 if overlength == "drop" else p + 2 for p, r in lengths]


def test_the_stage_writes_what_save_to_disk_writes(tokenizer, tmp_path):
    """Batches of 1,000 rows and a remainder, rows dropped on the way: the Arrow files, dataset_info.json
    and state.json (but its fingerprint) are those of Dataset.from_dict(...).save_to_disk."""
    import datasets

    from sabia_ift.data.tokenization import example_features

    write_formatted(tmp_path / "formatted", {"train": 2300, "val": 7, "test": 0}, long_every=97)
    cfg = params_for("tokenize", max_length=128, max_drop_share=0.5)
    metrics = tokenize(cfg, tokenizer, 2048, tmp_path / "formatted", tmp_path / "tok")
    assert metrics["train"]["dropped"] == 2300 // 97 and metrics["test"]["rows_in"] == 0
    assert json.loads((tmp_path / "tok" / "dataset_dict.json").read_text()) == {"splits": ["train", "validation"]}
    for split, name in (("train", "train"), ("val", "validation")):
        rows = [json.loads(line) for line in (tmp_path / "formatted" / f"{split}.jsonl").read_text().splitlines()]
        examples, counts = tokenize_split(tokenizer, rows, cfg)
        assert counts == metrics[split]
        datasets.Dataset.from_dict(examples, features=example_features()).save_to_disk(str(tmp_path / "ref" / name))
        ours, ref = tmp_path / "tok" / name, tmp_path / "ref" / name
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
        for file in ("data-00000-of-00001.arrow", "dataset_info.json"):
            assert (ours / file).read_bytes() == (ref / file).read_bytes(), file
        state, ref_state = (json.loads((folder / "state.json").read_text()) for folder in (ours, ref))
        assert {**state, "_fingerprint": None} == {**ref_state, "_fingerprint": None}


def test_a_large_split_is_written_in_shards(tokenizer, tmp_path, monkeypatch):
    import datasets

    from sabia_ift.artifacts import load_tokenized

    monkeypatch.setattr(datasets.config, "MAX_SHARD_SIZE", "150KB")
    write_formatted(tmp_path / "formatted", {"train": 3000, "val": 0, "test": 0})
    tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, tmp_path / "formatted", tmp_path / "tok")
    shards = sorted(p.name for p in (tmp_path / "tok" / "train").glob("*.arrow"))
    assert len(shards) > 1 and shards[-1] == f"data-{len(shards) - 1:05d}-of-{len(shards):05d}.arrow"
    train = load_tokenized(tmp_path / "tok")["train"]
    assert train["source_row"] == list(range(1, 3001))
    again = tmp_path / "again"
    tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, tmp_path / "formatted", again)
    assert ((tmp_path / "tok" / "train" / "state.json").read_bytes()
            == (again / "train" / "state.json").read_bytes())  # the fingerprint is the files'
