"""One validated config object per stage, read from its section of params.yaml.

Every key a stage uses lives in params.yaml, so DVC sees it (`dvc params diff`,
`dvc exp run -S`). Unknown keys and bad values are refused at load time with
their dotted name, before any work starts.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _split_size(value: Any) -> int | float:
    """A row count (an integer >= 0) or a share of the rows (a float strictly between 0 and 1).

    Explicit on purpose: 1.0 is not "one row", and YAML's `true` is not 1.
    """
    what = "must be a row count (an integer, 0 or more) or a share (a number strictly between 0 and 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}, got {value}")
        return value
    if not math.isfinite(value) or not 0 < value < 1:
        hint = f"; for a row count write {int(value)}" if math.isfinite(value) and value == int(value) \
            and value >= 1 else ""
        raise ValueError(f"{what}, got {value!r}{hint}")
    return value


SplitSize = Annotated[int | float, BeforeValidator(_split_size)]

_SHA = re.compile(r"^[0-9a-f]{40}$")


class _Section(BaseModel):
    # No infinities or NaN anywhere: `.inf` as a learning rate or epoch count
    # would train to NaN or never end.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        """YAML's true/false are not 1/0: a boolean goes only where a boolean is meant."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in typing.get_args(annotation):
                raise ValueError(f"expected {_kind_of(annotation)}, not a boolean")
        return value


def _kind_of(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if typing.get_origin(annotation) is list:
        return "a list"
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    args = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in args]
    names = {int: "a number", float: "a number", str: "a string"}
    kinds = sorted({names.get(a, "a value") for a in args})
    return " or ".join(kinds)


class TinyModelConfig(_Section):
    """A small LLaMA-architecture model built here, for CPU runs and tests.

    bitsandbytes' CPU 4-bit kernels need every linear dimension to be a
    multiple of 64, hence the checks.
    """

    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 384
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    max_position_embeddings: PositiveInt = 2048
    seed: int = 0
    # Plain-text pretraining that makes it a language model (sabia_ift/tiny_model.py).
    # The corpus comes from sample-generator seeds from corpus_seed up, never seed 0,
    # which made the bundled sample.
    corpus_seed: Annotated[int, Field(ge=1)] = 1
    pretrain_documents: PositiveInt = 3000
    pretrain_epochs: Annotated[int, Field(ge=0)] = 2
    pretrain_block: Annotated[int, Field(ge=16)] = 128
    pretrain_batch: PositiveInt = 16
    pretrain_lr: PositiveFloat = 3e-3

    @model_validator(mode="after")
    def _shapes(self) -> TinyModelConfig:
        for key in ("hidden_size", "intermediate_size"):
            if getattr(self, key) % 64:
                raise ValueError(f"{key} must be a multiple of 64 (4-bit kernels need it), got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class BaseConfig(_Section):
    """Section `base`: which base model the pipeline tunes and compares against."""

    source: Literal["tiny", "pretrained"] = "tiny"
    # A Hub id (org/name) or a local folder; used when source is `pretrained`.
    name_or_path: str = "maritaca-ai/sabia-7b"
    # For Hub ids: a commit sha, or a branch that is resolved to one and recorded
    # in models/base/base.json. Ignored for local folders.
    revision: str = "main"
    # Copy the weights into models/base so DVC tracks them (see README).
    copy_weights: bool = False
    tiny: TinyModelConfig = TinyModelConfig()


class ColumnMap(_Section):
    """Which source columns hold instruction, input (optional) and output."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"


class FetchConfig(_Section):
    """Section `fetch`: where the raw instruction rows come from."""

    source: Literal["file", "hub"] = "file"
    # For source `file`: a json, jsonl, csv or parquet file, optionally gzipped
    # (.jsonl.gz, .json.gz, .csv.gz). Required: a missing path is an error, never
    # a silent fallback to the bundled sample.
    path: Annotated[str, Field(min_length=1)] | None = None
    file_format: Literal["auto", "json", "jsonl", "csv", "parquet"] = "auto"
    columns: ColumnMap = ColumnMap()
    # For source `hub`: a Hugging Face dataset id at a commit sha, or a branch that
    # is resolved to one and recorded in data/raw/manifest.json.
    dataset: str = "dominguesm/Canarim-Instruct-PTBR-Dataset"
    revision: str = "main"
    split: str = "train"
    # Keep a random subset of this many rows (null: all), drawn with `seed`.
    max_rows: PositiveInt | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _path_for_files(self) -> FetchConfig:
        if self.source == "file" and self.path is None:
            raise ValueError("fetch.path is required when fetch.source is file "
                             "(the bundled sample is data/sample/instructions.jsonl)")
        return self


class FormatConfig(_Section):
    """Section `format`: template, cleaning and the train/val/test split."""

    val_size: SplitSize = 100
    test_size: SplitSize = 100
    seed: int = 42


class TokenizeConfig(_Section):
    """Section `tokenize`: token ids and loss labels."""

    max_length: Annotated[int, Field(ge=16)] = 512
    # Rows longer than max_length: `drop` them, or `truncate` the response
    # (a truncated response gets no EOS, so the model is never taught to stop
    # mid-sentence). Either way they are counted in metrics/tokenize.json.
    overlength: Literal["drop", "truncate"] = "drop"
    # The stage fails when more than this share of all rows is dropped (too
    # long for max_length), naming the max_length that would keep 95% of them.
    max_drop_share: Annotated[float, Field(ge=0, le=1)] = 0.05


class LoraConfigSection(_Section):
    r: PositiveInt = 16
    alpha: PositiveFloat = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Annotated[list[str], Field(min_length=1)] = ["q_proj", "k_proj", "v_proj"]


class TrainConfig(_Section):
    """Section `train`: LoRA/QLoRA hyperparameters; every one is here."""

    seed: int = 42
    epochs: PositiveFloat = 3
    # -1: run for `epochs`; a positive number stops after that many optimizer steps.
    max_steps: int = Field(default=-1, ge=-1)
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    # A share of the steps below 1, a step count from 1.
    warmup: Annotated[float, Field(ge=0)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: PositiveFloat = 1.0
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_torch"
    # `nf4`: QLoRA (bitsandbytes NF4 4-bit base weights); `none`: LoRA on full-precision weights.
    quantization: Literal["none", "nf4"] = "none"
    double_quant: bool = True
    # `auto`: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Activation memory: `off` keeps every activation (fastest, most memory); `on`
    # recomputes each decoder layer in the backward pass; `offload` also moves the
    # layer inputs it keeps to CPU memory (least GPU memory, for small cards).
    gradient_checkpointing: Literal["off", "on", "offload"] = "off"
    # Padding-free packing: rows concatenated into micro-batches of at most
    # micro_batch_tokens tokens; attention never crosses a row boundary.
    packing: bool = False
    micro_batch_tokens: Annotated[int, Field(ge=16)] = 4096
    # `auto`: varlen flash attention for packed rows on CUDA, SDPA otherwise.
    attention: Literal["auto", "sdpa", "varlen"] = "auto"
    # Fused kernels: `liger` (Liger Kernel: RMSNorm, RoPE, SwiGLU, linear cross-entropy; CUDA only).
    kernels: Literal["none", "liger"] = "none"
    # Group rows of similar length into batches so dynamic padding wastes little (unpacked only).
    group_by_length: bool = True
    lora: LoraConfigSection = LoraConfigSection()
    logging_steps: PositiveInt = 10
    eval_steps: PositiveInt = 50
    # Checkpoints for resuming an interrupted run (models/checkpoints, persisted by DVC).
    save_steps: PositiveInt = 50
    save_total_limit: PositiveInt = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes that train together (DDP): `auto` = every visible GPU (1 on CPU), or a number.
    devices: Literal["auto"] | PositiveInt = "auto"
    # Experiment trackers: `dvclive` (the project's curves in metrics/curves), plus any of the
    # Trainer's integrations wandb, mlflow, tensorboard (each must be installed). [] reports nowhere.
    report_to: list[Literal["dvclive", "wandb", "mlflow", "tensorboard"]] = ["dvclive"]

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare off/on as false/true.
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError(f"warmup is a share below 1 or a whole number of steps, got {self.warmup}")
        return self


class EvaluateConfig(_Section):
    """Section `evaluate`: base vs tuned generation on the test split."""

    max_new_tokens: PositiveInt = 64
    batch_size: PositiveInt = 16
    # Generate for the first N test rows (null: all of them).
    max_samples: PositiveInt | None = None
    repetition_ngram: PositiveInt = 4
    # Rows written to the side-by-side samples file.
    samples_to_write: Annotated[int, Field(ge=0)] = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"


GENERIC_TASKS = ("multiple_choice", "classification")


class BenchmarkColumns(_Section):
    """Where a generic task's fields are in its file."""

    # multiple_choice: the question, then either one list column of choices or
    # one column per choice (A, B, C, ... in order), and the answer letter.
    question: str = "question"
    choices: str | None = "choices"
    choice_columns: list[str] | None = None
    answer: str = "answer"
    # classification: the text and its label (one of the task's `labels`).
    text: str = "text"
    label: str = "label"
    id: str | None = None

    @model_validator(mode="after")
    def _one_choice_source(self) -> BenchmarkColumns:
        if self.choice_columns is not None and len(self.choice_columns) < 2:
            raise ValueError("choice_columns needs at least two columns")
        return self


class BenchmarkTask(_Section):
    """One task of the benchmark stage: a leaderboard task, or a generic one defined here."""

    # The name in metrics/benchmarks.json (and lm-eval's task name).
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    kind: Literal["enem", "assin2_rte", "assin2_sts", "faquad_nli", "tweetsentbr",
                  "multiple_choice", "classification"]
    # A local file (json, jsonl, csv, parquet; ASSIN 2 .xml). Built-in tasks
    # without one read `dataset` from the Hugging Face Hub at `revision`.
    path: str | None = None
    file_format: Literal["auto", "json", "jsonl", "csv", "parquet", "xml"] = "auto"
    # Few-shot examples come from here; without it they are held out of `path`.
    fewshot_path: str | None = None
    dataset: str | None = None
    revision: str = "main"
    # null: the leaderboard's count (built-in tasks) or 3 (generic tasks).
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    # generate: read the answer from generated text, like the leaderboard;
    # loglikelihood (generic tasks): the likeliest choice is the answer.
    scoring: Literal["generate", "loglikelihood"] = "generate"
    columns: BenchmarkColumns = BenchmarkColumns()
    # classification: the label names, as written in the file and in the prompt.
    labels: list[str] | None = None
    # Generic tasks: the instruction shown once before the examples.
    description: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkTask:
        generic = self.kind in GENERIC_TASKS
        if generic and self.path is None:
            raise ValueError(f"a {self.kind} task reads a local file: set path")
        if not generic and self.path is None and self.dataset is None:
            raise ValueError(f"{self.kind} without a path reads a Hub dataset: set dataset (and revision)")
        if self.kind == "classification" and (not self.labels or len(set(self.labels)) < 2):
            raise ValueError("a classification task needs at least two distinct labels")
        if not generic and self.scoring != "generate":
            raise ValueError(f"{self.kind} is scored as the leaderboard scores it: scoring must be generate")
        return self


class BenchmarkConfig(_Section):
    """Section `benchmark`: lm-evaluation-harness tasks, base vs tuned."""

    tasks: list[BenchmarkTask] = []
    # Examples per task (null: every example).
    limit: PositiveInt | None = None
    # `auto`: lm-eval finds the largest batch that fits; or a fixed size.
    batch_size: Literal["auto"] | PositiveInt = "auto"
    # Longest generated answer, in tokens (answers are a letter, a label or a number).
    max_gen_toks: PositiveInt = 16
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1234

    @model_validator(mode="after")
    def _unique_names(self) -> BenchmarkConfig:
        names = [task.name for task in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique: {', '.join(repeated)}")
        return self


SECTIONS: dict[str, type[_Section]] = {
    "base": BaseConfig,
    "fetch": FetchConfig,
    "format": FormatConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "benchmark": BenchmarkConfig,
}

C = TypeVar("C", bound=_Section)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line: where the parser gave up and why (its own text spans several lines).
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None:
            problem += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return data


def _describe(error: dict[str, Any], section: str) -> str:
    key = ".".join(str(part) for part in (section, *error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "value_error":
        # Our own validators' messages are whole sentences; pydantic's prefix adds nothing.
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"].removeprefix("Value error, ")
        return message if message.startswith(f"{key}.") else f"{key}: {message}"
    if "input" in error and error["type"] != "missing":
        return f"{key}: {error['msg']} (got {error['input']!r})"
    return f"{key}: {error['msg']}"


def parse_section(section: str, raw: Any, source: str = "params.yaml") -> _Section:
    cls = SECTIONS[section]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {section} must be a mapping, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, section) for err in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_section(section: str, path: str | Path = "params.yaml") -> Any:
    """Validate and return one stage's config; raises ConfigError naming the key."""
    params = read_params(path)
    if section not in params:
        raise ConfigError(f"{path}: missing section {section}")
    return parse_section(section, params[section], str(path))


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision and _SHA.match(revision))
