"""The files one stage writes for the next: their names and small schemas, in one place.

dvc.yaml names the output folders; this module names what lies inside them
and reads and writes the small JSON records stages hand each other, so a
producer and its consumers can never disagree on a file name or a key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import DataError, ModelError
from .io import write_json

# models/base: what the base stage resolved; the weights live there too for tiny/copied bases.
BASE_FILE = "base.json"
# data/raw
RAW_ROWS = "rows.jsonl"
RAW_MANIFEST = "manifest.json"
# data/formatted: one JSON Lines file per split, and the rows cleaning dropped.
SPLITS = ("train", "val", "test")
DROPPED = "dropped.jsonl"
# data/contamination: training rows sharing text with a test or benchmark item, and those tokenize drops.
FLAGGED = "flagged.jsonl"
CONTAMINATED = "drop.json"
# data/tokenized: Arrow folder; Hugging Face names for the format stage's splits.
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
# models/checkpoints: what a finished run leaves there (its checkpoints are gone).
CHECKPOINTS_NOTE = "README.txt"
# models/adapter: how training loaded the base, so every consumer loads it the same way.
TRAIN_META = "sabia_ift_train.json"

BaseSource = Literal["tiny", "local", "hub", "local_copy"]


def split_file(folder: str | Path, split: str) -> Path:
    return Path(folder) / f"{split}.jsonl"


@dataclass(frozen=True)
class BaseInfo:
    """models/base/base.json.

    `source` says where the weights are: `tiny` (built here, in the folder),
    `local` (a folder named by name_or_path), `hub` (HF cache, name_or_path at
    revision) or `local_copy` (copied into the folder; `origin` says from where).
    """

    source: BaseSource
    name_or_path: str | None = None
    revision: str | None = None
    requested_revision: str | None = None
    origin: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    def write(self, folder: str | Path) -> None:
        write_json(Path(folder) / BASE_FILE, self.to_dict())

    @classmethod
    def read(cls, folder: str | Path) -> BaseInfo:
        path = Path(folder) / BASE_FILE
        if not Path(folder).is_dir():
            raise ModelError(f"{folder}: no such base model folder; run the base stage first (dvc repro base), "
                             "or pass the folder's path")
        if not path.is_file():
            raise ModelError(f"{path}: missing; run the base stage first (dvc repro base)")
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"{path}: not a base record this version writes ({exc}); rerun the base stage") from None


@dataclass(frozen=True)
class TrainMeta:
    """models/adapter/sabia_ift_train.json: how the adapter's base was loaded in training."""

    quantization: str
    double_quant: bool
    precision: str
    base: dict[str, Any]

    def write(self, folder: str | Path) -> None:
        write_json(Path(folder) / TRAIN_META, asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> TrainMeta:
        folder = Path(folder)
        path = folder / TRAIN_META
        if not folder.is_dir():
            raise ModelError(f"{folder}: no such adapter folder; run the train stage first (dvc repro train), "
                             "or pass the adapter's path")
        if not path.is_file():
            raise ModelError(f"{path}: missing; {folder} is not an adapter this pipeline wrote, or it is "
                             "incomplete: rerun the train stage")
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"{path}: corrupt ({exc}); rerun the train stage") from None


# The train.* keys that decide how the base is loaded (dvc.yaml gives them, and no other train key, to
# the base stages): a base's results hold for any adapter trained on a base loaded the same way.
LOADING_KEYS = ("quantization", "double_quant", "precision")


def check_loading(adapter_dir: str | Path, loading: dict[str, Any], where: str) -> None:
    """Refuse base results measured on a base loaded otherwise than the adapter's (a stale base run)."""
    from .errors import DataError

    meta = asdict(TrainMeta.read(adapter_dir))
    differ = [f"train.{k} ({loading.get(k)} there, {meta[k]} for the adapter)" for k in LOADING_KEYS
              if loading.get(k) != meta[k]]
    if differ:
        raise DataError(f"{where}: the base results were measured on a base loaded with other settings: "
                        f"{', '.join(differ)}; rerun the base stages (dvc repro)")


def load_tokenized(folder: str | Path) -> dict[str, Any]:
    """data/tokenized's splits by Hugging Face name. A split that tokenize found
    empty is absent (the pinned datasets cannot store an empty one); use .get()."""
    import datasets

    from .errors import DataError

    try:
        return dict(datasets.load_from_disk(str(folder)))
    except FileNotFoundError:
        raise DataError(f"{folder}: no tokenized data; run the tokenize stage first (dvc repro tokenize)") from None


# metrics/eval_prompts.jsonl (evaluate writes, the report reads at two revisions): one record per
# test prompt, {"source_row", "prompt_sha1", "base": {score: value}, "tuned": {score: value}}.
# Each per-prompt score, and the metrics/eval.json key that is its mean over the prompts (chrf is
# the exception: eval.json holds the corpus-level chrF, the records hold sentence-level chrF).
PROMPT_SCORES = {"eos_stop": "eos_stop_rate", "rougeL": "rougeL", "chrf": "chrf", "exact_match": "exact_match",
                 "repetition": "repetition", "new_tokens": "mean_new_tokens"}


def prompt_sha1(prompt: str, reference: str) -> str:
    """Identifies a test prompt's content, so two revisions pair a source_row only if it is the same prompt."""
    return hashlib.sha1(f"{prompt}\0{reference}".encode()).hexdigest()[:16]


def split_metrics(full: dict[str, Any], detail_keys: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(compact, detail) of a stage's metrics record.

    The compact part is the declared DVC metric, a column each in `dvc metrics
    show` and `dvc exp show`: numbers only, without the keys named in
    `detail_keys` (at any depth). The detail part is the whole record, written
    beside it for whoever wants the distributions.
    """
    drop = set(detail_keys)

    def compact(node: dict[str, Any]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        for key, value in node.items():
            if key in drop:
                continue
            if isinstance(value, dict):
                inner = compact(value)
                if inner:
                    kept[key] = inner
            elif isinstance(value, int | float) and not isinstance(value, bool):
                kept[key] = value
        return kept

    return compact(full), full


def read_contaminated(folder: str | Path) -> set[int]:
    """source_row of each training row the contamination stage says to drop (policy drop; else none)."""
    path = Path(folder) / CONTAMINATED
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {int(row) for row in record["source_rows"]}
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the contamination stage first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: key source_rows: not a list of row numbers ({exc})") from None
