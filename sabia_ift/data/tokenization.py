"""Tokenize stage: token ids and loss labels for `<s>` + prompt + response + `</s>`.

Labels are -100 on BOS and the prompt, the token ids on the response and on
the final EOS. They are built here from positions, never from pad ids, so the
real EOS is always trained (the earlier attempt lost it by masking pad == eos).
No padding is added: the collator pads each batch to its own longest row.

The stage streams: rows are read, tokenized and written to Arrow a batch at a
time, the examples of a batch built with array arithmetic (build_example is the
rule, for one row).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from array import array
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import HF_SPLITS, split_file
from ..config import TokenizeConfig
from ..errors import ConfigError
from ..io import atomic_path, iter_jsonl
from ..progress import Progress
from ..template import IGNORE_INDEX, encode_batch, encode_text

log = logging.getLogger(__name__)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str],
                 heads_are_prompts: bool = False) -> tuple[list[list[int]], list[int], int]:
    """Each pair's ids (the prompt's, then the response's), where the response's begin,
    and how many pairs needed the fallback.

    The response ids are the tail of the tokenized prompt+response, so they are
    what the tokenizer produces for the text as a whole. If the tokenizer merges
    across the prompt/response boundary (it should not: the template ends in a
    newline), the prompt is kept as inference sees it and the response is
    tokenized alone; such rows are counted.

    With `heads_are_prompts` (see heads_are_prompts()), a pair whose whole text
    has a token boundary where the response begins takes its prompt ids from
    the head of the whole text's ids instead of tokenizing the prompt again.
    """
    full = encode_batch(tokenizer, [p + r for p, r in zip(prompts, responses)])
    ids: list[list[int]] = full["input_ids"]
    cuts = [0] * len(ids)
    alone = []
    for i, prompt in enumerate(prompts):
        cut = _boundary(full, i, len(prompt)) if heads_are_prompts else None
        if cut is None:
            alone.append(i)
        else:
            cuts[i] = cut
    fallback = 0
    if alone:
        for i, p in zip(alone, encode_text(tokenizer, [prompts[i] for i in alone])):
            cuts[i] = len(p)
            if ids[i][: len(p)] != p:
                fallback += 1
                ids[i] = p + encode_text(tokenizer, responses[i])
    return ids, cuts, fallback


def _boundary(encoding, row: int, at: int) -> int | None:
    """The index of the first token of text `row` that starts at character `at`, when no token
    crosses that character and none before it reaches past it; else None."""
    cut = encoding.char_to_token(row, at)
    if cut is None or cut == 0 or encoding.token_to_chars(row, cut).start != at:
        return None
    return cut if encoding.token_to_chars(row, cut - 1).end <= at else None


def heads_are_prompts(tokenizer) -> bool:
    """Whether this tokenizer's ids for a text, cut where a token boundary falls, begin with the
    ids of the text before the cut, so a prompt need not be tokenized twice.

    True of a fast BPE tokenizer (no dropout, no word prefix or suffix, merges always applied)
    whose normalizer and pre-tokenizer change nothing across a boundary: no normalizer, or
    Prepend and one-character Replace; no pre-tokenizer, or Metaspace. LLaMA's, Mistral's and
    Sabiá's are. No merge crosses the cut, so every merge on the prompt's side is one that the
    prompt alone makes: BPE applies merges by rank and position, and a pair across the cut that
    never merged changed nothing on either side. Any other tokenizer tokenizes prompts alone.
    """
    from tokenizers import models

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    model = backend.model
    if (not isinstance(model, models.BPE) or model.dropout or model.ignore_merges
            or model.continuing_subword_prefix or model.end_of_word_suffix):
        return False

    def config(part) -> dict[str, Any] | None:  # a component's own JSON, not the whole tokenizer's (the vocab)
        return None if part is None else json.loads(part.__getstate__())

    pre = config(backend.pre_tokenizer)
    return (pre is None or pre.get("type") == "Metaspace") and _local(config(backend.normalizer))


def _local(normalizer: dict[str, Any] | None) -> bool:
    """A normalizer whose output at a character depends only on that character (or the text's start)."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_local(inner) for inner in normalizer.get("normalizers", []))
    if kind == "Replace":
        return len((normalizer.get("pattern") or {}).get("String") or "") == 1 and bool(normalizer.get("content"))
    return kind == "Prepend"


def build_example(prompt: list[int], response: list[int], bos: int, eos: int, max_length: int,
                  overlength: str) -> tuple[dict[str, list[int]] | None, str]:
    """One training example, or None with the reason it was left out."""
    input_ids = [bos, *prompt, *response, eos]
    if len(input_ids) <= max_length:
        labels = [IGNORE_INDEX] * (1 + len(prompt)) + [*response, eos]
        return {"input_ids": input_ids, "labels": labels}, "ok"
    room = max_length - 1 - len(prompt)
    if room < 1:
        return None, "prompt_too_long"
    if overlength == "drop":
        return None, "too_long"
    # Truncated responses end without EOS: teaching a stop mid-sentence would
    # be worse than not teaching a stop on this row.
    kept = response[:room]
    return {"input_ids": [bos, *prompt, *kept], "labels": [IGNORE_INDEX] * (1 + len(prompt)) + kept}, "truncated"


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    if not len(lengths):
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    arr = np.asarray(lengths)
    return {
        "mean": round(float(arr.mean()), 2),
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p95": round(float(np.percentile(arr, 95)), 1),
        "max": int(arr.max()),
    }


COLUMNS = ("input_ids", "labels", "length", "source_row", "prompt_length")


def _examples(chunk: list[dict[str, Any]], encoded: tuple, first: int, cfg: TokenizeConfig, bos: int,
              eos: int, counts: dict[str, Any], needed) -> dict[str, np.ndarray]:
    """The examples of a chunk of rows, as build_example makes each, counted into `counts`.

    Columns are arrays; `offsets` marks where each example's input_ids and labels
    begin and end in theirs. `first` is the chunk's first row's place in its split, 0-based.
    """
    ids, cuts, fallback = encoded
    n = len(chunk)
    total = np.fromiter(map(len, ids), np.int64, n)
    prompt = np.asarray(cuts, np.int64)
    response = total - prompt
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(total.sum()))
    source = np.zeros(n, np.int64)
    np.cumsum(total[:-1], out=source[1:])
    whole = prompt + response + 2 <= cfg.max_length
    room = cfg.max_length - 1 - prompt
    truncate = cfg.overlength == "truncate"
    kept = whole | ((room >= 1) & truncate)
    counts["rows_in"] += n
    counts["boundary_fallback"] += fallback
    counts["truncated"] += int((kept & ~whole).sum())
    counts["dropped_too_long"] += int((~whole & (room >= 1) & (not truncate)).sum())
    counts["dropped_prompt_too_long"] += int((~whole & (room < 1)).sum())
    if needed is not None:
        # Kept whole: BOS + prompt + response + EOS; truncated: at least one response token.
        needed.extend((prompt + 2 + (0 if truncate else response)).tolist())
    # Each kept example: BOS, a body (the prompt and all of the response, or as much as fits), EOS if whole.
    with_eos = whole[kept]
    body = np.where(whole, total, prompt + room)[kept]
    length = 1 + body + with_eos
    offsets = np.zeros(len(length) + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    starts = offsets[:-1]
    input_ids = np.empty(int(offsets[-1]), np.int32)
    input_ids[starts] = bos
    input_ids[offsets[1:][with_eos] - 1] = eos
    body_starts = np.zeros(len(body), np.int64)
    np.cumsum(body[:-1], out=body_starts[1:])
    within = np.arange(int(body.sum())) - np.repeat(body_starts, body)
    input_ids[np.repeat(starts + 1, body) + within] = flat[np.repeat(source[kept], body) + within]
    prompt_length = 1 + prompt[kept]
    labels = input_ids.copy()
    labels[np.arange(len(input_ids)) - np.repeat(starts, length) < np.repeat(prompt_length, length)] = IGNORE_INDEX
    # Rows made by hand (tests, scripts) may lack one: their place in the split stands in.
    source_row = np.fromiter((row.get("source_row", first + i + 1) for i, row in enumerate(chunk)), np.int64, n)
    counts["rows"] += len(length)
    counts["tokens"] += int(length.sum())
    # Every position after BOS and the prompt is trained.
    counts["trained_tokens"] += int((length - prompt_length).sum())
    return {"offsets": offsets, "input_ids": input_ids, "labels": labels, "length": length.astype(np.int32),
            "source_row": source_row[kept], "prompt_length": prompt_length.astype(np.int32)}


def _as_lists(part: dict[str, np.ndarray]) -> dict[str, list]:
    """A chunk's examples as lists, one per example (tokenize_split's form)."""
    bounds = list(zip(part["offsets"][:-1].tolist(), part["offsets"][1:].tolist()))
    out: dict[str, list] = {}
    for name in COLUMNS:
        values = part[name].tolist()
        out[name] = [values[a:b] for a, b in bounds] if name in ("input_ids", "labels") else values
    return out


def _encoded_chunks(tokenizer, rows: Iterator[dict[str, Any]], batch: int,
                    reuse: bool) -> Iterator[tuple[list, tuple]]:
    """Chunks of `batch` rows, each with its encode_pairs result (`reuse`: heads_are_prompts).

    The tokenizer works in a thread, a chunk ahead, while this one reads rows
    and the caller builds and writes the examples: the fast tokenizer runs
    without the GIL, so the two overlap on a machine of two cores.
    """

    def encode(chunk: list[dict[str, Any]]) -> tuple:
        return encode_pairs(tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk], reuse)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        pending: deque[tuple[list, Future]] = deque()
        while True:
            chunk = list(itertools.islice(rows, batch))
            if chunk:
                pending.append((chunk, pool.submit(encode, chunk)))
            if pending and (len(pending) > 1 or not chunk):
                done, encoded = pending.popleft()
                yield done, encoded.result()
            if not chunk and not pending:
                return


def _tokenized(tokenizer, rows: Iterator[dict[str, Any]], cfg: TokenizeConfig, counts: dict[str, Any], needed,
               batch: int, progress: Progress, reuse: bool) -> Iterator[dict[str, np.ndarray]]:
    """The examples of each chunk of `rows`, counted into `counts`."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for chunk, encoded in _encoded_chunks(tokenizer, rows, batch, reuse):
        yield _examples(chunk, encoded, counts["rows_in"], cfg, bos, eos, counts, needed)
        progress(len(chunk))
    progress.close()
    counts["dropped"] = counts["dropped_too_long"] + counts["dropped_prompt_too_long"]
    counts["drop_share"] = round(counts["dropped"] / counts["rows_in"], 4) if counts["rows_in"] else 0.0


def _new_counts() -> dict[str, Any]:
    return {"rows_in": 0, "rows": 0, "truncated": 0, "dropped_too_long": 0, "dropped_prompt_too_long": 0,
            "dropped_contaminated": 0,
            "boundary_fallback": 0, "tokens": 0, "trained_tokens": 0}


def tokenize_split(tokenizer, rows: list[dict[str, Any]], cfg: TokenizeConfig, batch: int = 1024,
                   needed: list[int] | None = None, label: str = "tokenize"):
    """Examples and counters for one split held in memory; progress goes to stderr under `label`.

    Each example keeps its row's `source_row` and `prompt_length` (BOS + prompt),
    so evaluation asks exactly the prompts that survived here. `needed`, when
    given, receives each row's shortest max_length that would keep it.
    """
    examples: dict[str, list] = {name: [] for name in COLUMNS}
    counts = _new_counts()
    progress = Progress(len(rows), label, unit="row")
    for part in _tokenized(tokenizer, iter(rows), cfg, counts, needed, batch, progress, heads_are_prompts(tokenizer)):
        for name, values in _as_lists(part).items():
            examples[name].extend(values)
    counts["length"] = length_stats(examples["length"])
    return examples, counts


def _count_lines(path: Path) -> int:
    """Lines in a file, for progress; 0 when it is missing (iter_jsonl then says so)."""
    try:
        with path.open("rb") as fh:
            return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _without(rows: Iterator[dict[str, Any]], skip: AbstractSet[int], counts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`rows` less those whose source_row is in `skip`, counted as dropped_contaminated."""
    for row in rows:
        if row["source_row"] in skip:
            counts["dropped_contaminated"] += 1
        else:
            yield row


def tokenize_file(tokenizer, path: Path, cfg: TokenizeConfig, out: ArrowSplit, needed, reuse: bool,
                  batch: int = 1024, label: str = "tokenize", skip: AbstractSet[int] = frozenset()) -> dict[str, Any]:
    """tokenize_split for a split file, streamed: its examples go to `out` as they are made
    (`reuse`: heads_are_prompts(tokenizer)). Rows whose source_row is in `skip` (the contamination
    stage's, policy drop) are left out before tokenizing, and counted."""
    counts = _new_counts()
    lengths = array("i")
    progress = Progress(_count_lines(path), label, unit="row")
    rows = _without(iter_jsonl(path), skip, counts) if skip else iter_jsonl(path)
    for part in _tokenized(tokenizer, rows, cfg, counts, needed, batch, progress, reuse):
        out.add(part)
        lengths.extend(part["length"].tolist())
    counts["length"] = length_stats(lengths)
    return counts


def check_drop_share(cfg: TokenizeConfig, metrics: dict[str, dict[str, Any]], needed: Sequence[int],
                     context_length: int | None) -> None:
    """Refuse to lose more than tokenize.max_drop_share of the rows to max_length, silently or not."""
    rows_in = sum(m["rows_in"] for m in metrics.values())
    dropped = sum(m["dropped"] for m in metrics.values())
    if not rows_in or dropped / rows_in <= cfg.max_drop_share:
        return
    keep95 = int(math.ceil(np.percentile(np.asarray(needed), 95, method="higher")))
    per_split = ", ".join(f"{split} {m['dropped']} of {m['rows_in']}" for split, m in metrics.items())
    advice = f"a tokenize.max_length of {keep95} would keep 95% of rows"
    if context_length is not None and keep95 > context_length:
        advice += f", but the base model's context is {context_length} tokens"
    other = "tokenize.overlength: truncate, or " if cfg.overlength == "drop" else ""
    raise ConfigError(
        f"tokenize.max_drop_share: {dropped} of {rows_in} rows ({dropped / rows_in:.1%}) do not fit "
        f"tokenize.max_length {cfg.max_length} and would be dropped ({per_split}), above the allowed "
        f"{cfg.max_drop_share:.1%}; {advice}. Or set {other}a higher tokenize.max_drop_share"
    )


def summary(metrics: dict[str, Any]) -> str:
    """What the stage prints: rows kept and dropped per split."""
    parts = []
    for split in HF_SPLITS:
        m = metrics[split]
        part = f"{split} {m['rows']} of {m['rows_in']} rows"
        if m["dropped"]:
            part += f" ({m['dropped']} dropped, {m['drop_share']:.1%}, too long for max_length {metrics['max_length']})"
        if m["truncated"]:
            part += f" ({m['truncated']} truncated)"
        if m.get("dropped_contaminated"):
            part += f" ({m['dropped_contaminated']} more left out as contaminated)"
        parts.append(part)
    return "tokenized: " + "; ".join(parts)


def tokenize(cfg: TokenizeConfig, tokenizer, context_length: int | None, formatted_dir: str | Path,
             out_dir: str | Path, contaminated: AbstractSet[int] = frozenset()) -> dict[str, Any]:
    """Run the tokenize stage: an Arrow DatasetDict on disk and the stage metrics.

    `contaminated`: source_row of training rows to leave out (the contamination stage's policy drop),
    counted in the train split's dropped_contaminated; rows_in counts the rows tokenized.

    Rows stream from each split file to its Arrow files; the stage holds a
    batch of rows and 8 bytes per row (its length, and the length that would keep it).
    """
    if context_length is not None and cfg.max_length > context_length:
        raise ConfigError(
            f"tokenize.max_length: {cfg.max_length} is above the base model's context of {context_length} tokens"
        )
    metrics: dict[str, Any] = {}
    needed = array("i")
    reuse = heads_are_prompts(tokenizer)
    with atomic_path(out_dir, is_dir=True) as tmp:
        written = []
        for split, name in HF_SPLITS.items():
            out = ArrowSplit(tmp / name, example_features())
            metrics[split] = tokenize_file(tokenizer, split_file(formatted_dir, split), cfg, out, needed, reuse,
                                           label=f"tokenize {split}",
                                           skip=contaminated if split == "train" else frozenset())
            # Empty splits are left out: the pinned datasets writes no file for one,
            # and load_from_disk would then fail. Readers treat a missing split as empty.
            if out.close():
                written.append(name)
        check_drop_share(cfg, metrics, needed, context_length)
        if not metrics["train"]["rows"]:
            raise ConfigError(f"{split_file(formatted_dir, 'train')}: no training row fits tokenize.max_length "
                              f"{cfg.max_length} ({metrics['train']['rows_in']} rows in the train split)")
        for split, split_name in (("val", "validation"), ("test", "test")):
            if not metrics[split]["rows"]:
                log.warning("the %s split is empty after tokenize (%d rows in): %s", split_name,
                            metrics[split]["rows_in"],
                            "training runs without evaluation" if split == "val" else "evaluate skips generation")
        write_dataset_dict(tmp, written)
    # No timings here: metrics/tokenize.json must be identical on every rerun.
    return {"max_length": cfg.max_length, "overlength": cfg.overlength, **metrics}


def example_features():
    """The columns of data/tokenized, as datasets types them."""
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "source_row": datasets.Value("int64"),
        "prompt_length": datasets.Value("int32"),
    })


def write_dataset_dict(folder: Path, splits: list[str]) -> None:
    """The DatasetDict's own record, as DatasetDict.save_to_disk writes it."""
    with (folder / "dataset_dict.json").open("w", encoding="utf-8") as fh:
        json.dump({"splits": splits}, fh)


class ArrowSplit:
    """One split of a DatasetDict folder, written as its examples come.

    What Dataset.save_to_disk writes for a split built with Dataset.from_dict
    (Arrow stream files of 1,000-row record batches through datasets' own
    ArrowWriter, dataset_info.json, state.json), without the split ever in
    memory. Two things differ, because save_to_disk sees the whole split first:
    a shard is closed once it holds datasets' 500 MB (save_to_disk spreads the
    same rows evenly over as many shards), and the fingerprint in state.json is
    a digest of the files written (datasets hashes the pickled in-memory table).
    """

    BATCH = 1000  # datasets.config.DEFAULT_MAX_BATCH_SIZE: save_to_disk's record batch

    def __init__(self, folder: Path, features) -> None:
        from datasets import config
        from datasets.utils.py_utils import convert_file_size_to_int

        self.folder, self.features = folder, features
        self.max_shard_bytes = convert_file_size_to_int(config.MAX_SHARD_SIZE)
        self.pending: list[Any] = []  # tables not yet written, with pending_rows rows
        self.pending_rows = 0
        self.rows = 0
        self.shards: list[Path] = []
        self.writer: Any = None
        self.shard_bytes = 0

    def add(self, part: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        offsets = pa.array(part["offsets"].astype(np.int32))
        table = pa.Table.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(part["input_ids"])),
             pa.ListArray.from_arrays(offsets, pa.array(part["labels"])),
             pa.array(part["length"]), pa.array(part["source_row"]), pa.array(part["prompt_length"])],
            schema=self.features.arrow_schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.BATCH:
            self._write(self.pending_rows - self.pending_rows % self.BATCH)

    def _write(self, n: int) -> None:
        """Write the first n pending rows (whole record batches of BATCH rows, or the last one)."""
        import pyarrow as pa
        from datasets.arrow_writer import ArrowWriter

        table = pa.concat_tables(self.pending)
        self.pending = [table.slice(n)] if n < table.num_rows else []
        self.pending_rows = table.num_rows - n
        table = table.slice(0, n)
        if self.writer is None or self.shard_bytes >= self.max_shard_bytes:
            self._close_shard()
            self.folder.mkdir(exist_ok=True)
            self.shards.append(self.folder / f".shard-{len(self.shards):05d}.arrow")
            self.writer = ArrowWriter(features=self.features, path=str(self.shards[-1]), embed_local_files=True,
                                      writer_batch_size=self.BATCH)
        self.writer.write_table(table)
        self.shard_bytes += table.nbytes
        self.rows += n

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.writer.close()
            self.writer, self.shard_bytes = None, 0

    def close(self) -> int:
        """Write what is left and the split's records; the number of rows (0: nothing written)."""
        import datasets
        from datasets.utils.py_utils import asdict  # save_to_disk's: fields at their default left out

        if self.pending_rows:
            self._write(self.pending_rows)
        self._close_shard()
        if not self.rows:
            return 0
        files = []
        digest = hashlib.blake2b(digest_size=8)
        for i, shard in enumerate(self.shards):
            name = f"data-{i:05d}-of-{len(self.shards):05d}.arrow"
            shard.rename(self.folder / name)
            files.append({"filename": name})
            with (self.folder / name).open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        state: dict[str, Any] = {"_data_files": files, "_fingerprint": digest.hexdigest(), "_format_columns": None,
                                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                                 "_split": None}
        with (self.folder / "state.json").open("w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
        info = asdict(datasets.DatasetInfo(features=self.features))
        with (self.folder / "dataset_info.json").open("w", encoding="utf-8") as fh:
            json.dump({key: info[key] for key in sorted(info)}, fh, indent=2)
        return self.rows
