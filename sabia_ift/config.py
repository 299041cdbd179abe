"""One validated config object per stage, read from its section of params.yaml.

Every key a stage uses lives in params.yaml, so DVC sees it (`dvc params diff`,
`dvc exp run -S`). Unknown keys and bad values are refused at load time with
their dotted name, before any work starts.
"""

from __future__ import annotations

import importlib.util
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

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


Device = Literal["auto", "cpu", "cuda"]
# Names as transformers spells them (OptimizerNames, SchedulerType), limited to those
# this project runs. Importing transformers here would cost seconds in every stage
# that never trains (fetch, format), so tests/test_config.py checks them against the enums.
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]

_SHA = re.compile(r"^[0-9a-f]{40}$")

# train.report_to's trackers and the packages that provide each (the first is the one to
# install); transformers accepts tensorboardX for TensorBoard too.
TRACKER_PACKAGES = {"dvclive": ("dvclive",), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "tensorboard": ("tensorboard", "tensorboardX")}
Tracker = Literal["dvclive", "wandb", "mlflow", "tensorboard"]


def _key(description: str, **constraints: Any) -> Any:
    """A required field: its value lives in params.yaml only, never in a default here."""
    return Field(description=description, **constraints)


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

    hidden_size: PositiveInt = _key("width of the tiny model (a multiple of 64)")
    intermediate_size: PositiveInt = _key("MLP width (a multiple of 64)")
    num_layers: PositiveInt = _key("decoder layers")
    num_heads: PositiveInt = _key("attention heads (must divide hidden_size)")
    max_position_embeddings: PositiveInt = _key("context length the model accepts")
    seed: int = _key("seed of the random initial weights")
    # The corpus comes from sample-generator seeds from corpus_seed up, never seed 0,
    # which made the bundled sample.
    corpus_seed: Annotated[int, Field(ge=1)] = _key("first sample-generator seed of the pretraining corpus (>= 1)")
    pretrain_documents: PositiveInt = _key("plain-text documents it is pretrained on")
    pretrain_epochs: Annotated[int, Field(ge=0)] = _key("pretraining epochs (0: random weights)")
    pretrain_block: Annotated[int, Field(ge=16)] = _key("tokens per pretraining block")
    pretrain_batch: PositiveInt = _key("blocks per pretraining step")
    pretrain_lr: PositiveFloat = _key("pretraining learning rate")

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

    source: Literal["tiny", "pretrained"] = _key("tiny: build a small LLaMA here; pretrained: load name_or_path")
    name_or_path: str = _key("Hub id (org/name) or local folder, for source pretrained")
    revision: str = _key("Hub commit sha, or a branch resolved to one and recorded in base.json; "
                         "ignored for local folders")
    copy_weights: bool = _key("copy the weights into models/base so DVC tracks them")
    tiny: TinyModelConfig = _key("the tiny model, for source tiny")


class ColumnMap(_Section):
    """Which source columns hold instruction, input (optional) and output."""

    instruction: str = _key("column holding the instruction")
    input: str | None = _key("column holding the optional input (null: none)")
    output: str = _key("column holding the expected answer")

    @model_validator(mode="after")
    def _distinct(self) -> ColumnMap:
        # One column as instruction and answer would train the model to repeat the question.
        keys = [key for key in ("instruction", "input", "output") if getattr(self, key) is not None]
        for i, first in enumerate(keys):
            for second in keys[i + 1:]:
                if getattr(self, first) == getattr(self, second):
                    raise ValueError(f"fetch.columns.{first} and fetch.columns.{second} both name column "
                                     f"{getattr(self, first)!r}; each must name a column of its own")
        return self


class FetchConfig(_Section):
    """Section `fetch`: where the raw instruction rows come from."""

    source: Literal["file", "hub"] = _key("file: read path; hub: download dataset")
    # Required for files: a missing path is an error, never a silent fallback to the sample.
    path: Annotated[str, Field(min_length=1)] | None = _key("json, jsonl or csv (each may be .gz) or parquet file, "
                                                            "for source file")
    file_format: Literal["auto", "json", "jsonl", "csv", "parquet"] = _key("format of path (auto: from its suffix)")
    columns: ColumnMap = _key("source column names")
    dataset: str = _key("Hugging Face dataset id, for source hub")
    revision: str = _key("dataset commit sha, or a branch resolved to one and recorded in data/raw/manifest.json")
    split: str = _key("dataset split to read")
    max_rows: PositiveInt | None = _key("keep a random subset of this many rows (null: all)")
    seed: int = _key("seed of the max_rows subset")

    @model_validator(mode="after")
    def _path_for_files(self) -> FetchConfig:
        if self.source == "file" and self.path is None:
            raise ValueError("fetch.path is required when fetch.source is file "
                             "(the bundled sample is data/sample/instructions.jsonl)")
        return self


class FormatConfig(_Section):
    """Section `format`: template, cleaning and the train/val/test split."""

    val_size: SplitSize = _key("validation rows (int) or share (0 < float < 1)")
    test_size: SplitSize = _key("test rows (int) or share (0 < float < 1)")
    seed: int = _key("seed of the split")


class TokenizeConfig(_Section):
    """Section `tokenize`: token ids and loss labels."""

    max_length: Annotated[int, Field(ge=16)] = _key("longest row in tokens, prompt and answer together")
    # A truncated response gets no EOS, so the model is never taught to stop mid-sentence.
    overlength: Literal["drop", "truncate"] = _key("rows over max_length: drop them, or truncate the answer "
                                                   "(no EOS then); counted in the metrics")
    max_drop_share: Annotated[float, Field(ge=0, le=1)] = _key(
        "fail when a larger share of rows is too long for max_length (the error names the max_length "
        "that keeps 95%)")


class LoraConfigSection(_Section):
    """LoRA adapter shape."""

    r: PositiveInt = _key("LoRA rank")
    alpha: PositiveInt = _key("LoRA scaling numerator (scale = alpha / r)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = _key("dropout on the LoRA input")
    target_modules: Annotated[list[str], Field(min_length=1)] = _key("linear layers that get an adapter")


class TrainConfig(_Section):
    """Section `train`: LoRA/QLoRA hyperparameters; every one is here."""

    seed: int = _key("seed of weights init, shuffling and dropout")
    epochs: PositiveFloat = _key("passes over the train split")
    max_steps: int = _key("-1: run for epochs; n > 0: stop after n optimizer steps")
    micro_batch_size: PositiveInt = _key("rows per forward pass")
    grad_accum: PositiveInt = _key("micro-batches per optimizer step")
    lr: PositiveFloat = _key("peak learning rate")
    lr_scheduler: Scheduler = _key("transformers SchedulerType name")
    warmup: Annotated[float, Field(ge=0)] = _key("warm-up: a share of the steps below 1, a step count from 1")
    weight_decay: Annotated[float, Field(ge=0)] = _key("AdamW weight decay")
    max_grad_norm: PositiveFloat = _key("gradient clipping norm")
    optim: Optimizer = _key("transformers OptimizerNames name")
    quantization: Literal["none", "nf4"] = _key("nf4: QLoRA on 4-bit base weights; none: full-precision LoRA")
    double_quant: bool = _key("also quantize the 4-bit quantization constants (nf4 only)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _key("auto: bf16 where the GPU has it, else fp16; "
                                                              "fp32 on CPU")
    gradient_checkpointing: Literal["off", "on", "offload"] = _key(
        "off: keep every activation (fastest); on: recompute each decoder layer in backward; "
        "offload: also keep the layer inputs in CPU memory (least GPU memory)")
    packing: bool = _key("concatenate rows into micro-batches of micro_batch_tokens, no padding; "
                         "attention never crosses a row")
    micro_batch_tokens: Annotated[int, Field(ge=16)] = _key("token budget of a packed micro-batch")
    attention: Literal["auto", "sdpa", "varlen"] = _key("auto: varlen flash attention for packed rows on CUDA "
                                                         "(cuDNN's when the rows are of one length), SDPA "
                                                         "otherwise")
    kernels: Literal["none", "liger"] = _key("liger: Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear "
                                             "cross-entropy (CUDA only)")
    fused_lora: bool = _key("each LoRA projection and its frozen (4-bit) weight in one autograd function: "
                            "projections of one input (q/k/v, gate/up) together, fewer passes over the "
                            "activations, same numbers (any device); false: peft's forward")
    base_matmul: Literal["dense", "fp8"] = _key(
        "dense: the frozen base's products in the compute dtype (bf16 on GPUs); fp8: in FP8, activations "
        "scaled per row, the weights kept in FP8 (1 byte a parameter more; Ada/Hopper GPUs or CPU; not with "
        "gradient_checkpointing: offload or precision fp16)")
    group_by_length: bool = _key("batch rows of similar length so padding wastes little (unpacked only)")
    loss_weighting: Literal["tokens", "rows"] = _key(
        "tokens: every trained token of a step counts alike; rows: every row of the run counts alike, its "
        "tokens sharing its weight, however many rows a step holds (the logged train loss stays the token mean)")
    lora: LoraConfigSection = _key("LoRA adapter shape")
    logging_steps: PositiveInt = _key("optimizer steps between train-loss logs")
    eval_steps: PositiveInt = _key("optimizer steps between validation losses")
    save_steps: PositiveInt = _key("optimizer steps between resumable checkpoints")
    save_total_limit: PositiveInt = _key("checkpoints kept")
    device: Device = _key("auto: cuda if present, else cpu")
    devices: Literal["auto"] | PositiveInt = _key("processes training together (DDP under torchrun): auto = "
                                                  "every visible GPU (1 on CPU), or a number")
    report_to: list[Tracker] = _key(
        "trackers: dvclive (the curves in metrics/curves), wandb, mlflow, tensorboard (installed); [] for none")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        # 0 is not "no training": the Trainer would still run a step.
        if value != -1 and value < 1:
            raise ValueError(f"must be -1 (run for train.epochs) or a positive number of optimizer steps, got {value}")
        return value

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        # Checked here, not only when training starts, so `sabia-ift check-params` and
        # `run-preset` refuse it before `dvc exp run` has removed the stage's outputs.
        for name in value:
            packages = TRACKER_PACKAGES[name]
            if not any(importlib.util.find_spec(package) for package in packages):
                raise ValueError(f"{name} is not installed (no {' or '.join(packages)} package): "
                                 f"pip install {packages[0]}, or remove {name} from train.report_to")
        return value

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

    @model_validator(mode="after")
    def _fp8(self) -> TrainConfig:
        if self.base_matmul != "fp8":
            return self
        # The offload's recompute multiplies by the 4-bit weights itself, and keeping an FP8
        # copy (1 byte a parameter) is the opposite of what a small card runs offload for.
        if self.gradient_checkpointing == "offload":
            raise ValueError("base_matmul: fp8 is for the fast configurations: gradient_checkpointing must be "
                             "off or on, not offload")
        if self.precision == "fp16":
            raise ValueError("base_matmul: fp8 writes bf16 products: precision must be auto or bf16, not fp16")
        return self


class EvaluateConfig(_Section):
    """Section `evaluate`: base vs tuned generation on the test split."""

    max_new_tokens: PositiveInt = _key("longest generated answer in tokens")
    batch_size: PositiveInt = _key("prompts generated together")
    max_samples: PositiveInt | None = _key("generate for the first N test rows (null: all)")
    repetition_ngram: PositiveInt = _key("n-gram length of the repetition metric")
    samples_to_write: Annotated[int, Field(ge=0)] = _key("rows written to the side-by-side samples file")
    device: Device = _key("auto: cuda if present, else cpu")
    engine: Literal["auto", "fast", "hf"] = _key(
        "generation engine: fast (a plain bf16 copy, adapter merged, a fixed KV cache and one CUDA graph a "
        "decoding step, batch from free memory), "
        "hf (the loaded model with HF generate, 4-bit where it is), auto (fast on CUDA where the copy fits, else hf)")


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

    tasks: list[BenchmarkTask] = _key("lm-eval tasks: built-in leaderboard kinds or generic ones from a file")
    limit: PositiveInt | None = _key("examples scored per task: a seeded sample, stratified by answer (null: all)")
    batch_size: Literal["auto"] | PositiveInt = _key("auto: lm-eval finds the largest batch that fits; or a size")
    max_gen_toks: PositiveInt = _key("longest generated answer in tokens (a letter, a label or a number)")
    device: Device = _key("auto: cuda if present, else cpu")
    engine: Literal["auto", "fast", "hf"] = _key(
        "model the tasks run on: fast (a plain bf16 copy, adapter merged; greedy answers from the evaluate "
        "stage's fast engine), hf (the loaded model, 4-bit where it is), auto (fast on CUDA where the copy fits)")
    seed: int = _key("seed of the draws of the scored rows (limit) and of the few-shot examples")

    @model_validator(mode="after")
    def _unique_names(self) -> BenchmarkConfig:
        names = [task.name for task in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique: {', '.join(repeated)}")
        return self


class ContaminationConfig(_Section):
    """Section `contamination`: word n-gram overlap of training rows with the test split and the benchmarks."""

    n: Annotated[int, Field(ge=5, le=50)] = _key(
        "words in an n-gram; a training row sharing one with an item is flagged (13: lm-evaluation-harness)")
    min_item_words: Annotated[int, Field(ge=3)] = _key(
        "an item shorter than n words is matched on its whole word sequence when it has at least this many "
        "words; shorter items are not checked (counted as items_too_short)")
    min_item_share: Annotated[float, Field(ge=0, le=1)] = _key(
        "a row is flagged for an item when the n-grams they share cover at least this share of the item's "
        "words (0: any shared n-gram)")
    policy: Literal["report", "drop", "fail"] = _key(
        "report: flag only; drop: flagged training rows are removed before tokenize (counted); "
        "fail: the stage stops with the counts")
    longest: Annotated[int, Field(ge=0)] = _key("longest overlaps listed in metrics/contamination.json")

    @model_validator(mode="after")
    def _short_below_n(self) -> ContaminationConfig:
        if self.min_item_words > self.n:
            raise ValueError(f"min_item_words ({self.min_item_words}) must not exceed n ({self.n})")
        return self


SECTIONS: dict[str, type[_Section]] = {
    "base": BaseConfig,
    "fetch": FetchConfig,
    "format": FormatConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "benchmark": BenchmarkConfig,
    "contamination": ContaminationConfig,
}

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


def _describe(error: ErrorDetails, section: str) -> str:
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


def base_loading(path: str | Path = "params.yaml") -> dict[str, Any]:
    """train.quantization, train.double_quant and train.precision: how training loads the base, and so
    how the base stages load it (their only train.* params in dvc.yaml)."""
    from .artifacts import LOADING_KEYS

    train = load_section("train", path)
    return {key: getattr(train, key) for key in LOADING_KEYS}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def section_from_params(section: str, overrides: dict[str, Any] | None = None,
                        path: str | Path = "params.yaml") -> Any:
    """One section of params.yaml with some values changed (tests, benchmarks)."""
    params = read_params(path)
    return parse_section(section, merge(params.get(section) or {}, overrides or {}), str(path))


def describe_keys(section: str | None = None) -> list[tuple[str, str]]:
    """(dotted key, help text) for every key of one section, or of all of them."""

    def walk(cls: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
        rows = []
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                rows.extend(walk(annotation, f"{prefix}{name}."))
            else:
                text = field.description or ""
                if get_origin(annotation) is Literal:
                    text += f" ({' | '.join(map(str, get_args(annotation)))})"
                rows.append((f"{prefix}{name}", text))
        return rows

    sections = [section] if section else list(SECTIONS)
    return [row for name in sections for row in walk(SECTIONS[name], f"{name}.")]


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision and _SHA.match(revision))
