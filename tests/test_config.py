"""Params are validated per stage; bad keys and values are refused with their dotted name."""

from typing import get_args

import pytest
import yaml

from conftest import REPO, deep_merge, default_params
from sabia_ift.cli import main
from sabia_ift.config import SECTIONS, describe_keys, load_section, parse_section, read_params, section_from_params
from sabia_ift.errors import ConfigError
from sabia_ift.presets import load_preset, set_args


def write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_default_params_validate(section):
    load_section(section, REPO / "params.yaml")


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate_over_params(preset):
    """A preset holds only differences: each must be a real key, and the merge must validate."""
    diff = load_preset(str(preset), REPO / "params.yaml")
    assert diff and set(diff) <= set(SECTIONS)
    assert set_args(diff)


def test_preset_with_a_bad_value_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bad.yaml").write_text("train:\n  lora:\n    rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml over .*train\.lora\.rank: unknown key"):
        load_preset("bad", tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="no such preset; known: bad"):
        load_preset("nope", tmp_path / "params.yaml")


def test_preset_values_keep_their_types_in_dvc_overrides():
    diff = {"train": {"lr": 1e-05, "lora": {"target_modules": ["q_proj"]}, "packing": False},
            "base": {"revision": "0123456789", "name_or_path": "org/it's"}, "fetch": {"max_rows": None}}
    assert set_args(diff) == ["-S", "train.lr=1e-5", "-S", "train.lora.target_modules=['q_proj']",
                              "-S", "train.packing=false", "-S", "base.revision='0123456789'",
                              "-S", "base.name_or_path='org/it\\'s'", "-S", "fetch.max_rows=null"]


def test_params_file_lists_every_key():
    """Values read outside params.yaml would be invisible to DVC: every field is spelled out."""
    params = default_params()

    def keys(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    for section, cls in SECTIONS.items():
        for dotted in keys(cls):
            node = params[section]
            for part in dotted.split("."):
                assert part in node, f"params.yaml lacks {section}.{dotted}"
                node = node[part]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"lora": {"r": 0}}}, "train.lora.r"),
        ({"train": {"lora": {"rank": 8}}}, "train.lora.rank: unknown key"),
        ({"train": {"learning_rate": 1e-4}}, "train.learning_rate: unknown key"),
        ({"train": {"quantization": "int4"}}, "train.quantization"),
        ({"train": {"warmup": 2.5}}, "warmup"),
        ({"base": {"tiny": {"hidden_size": 100}}}, "multiple of 64"),
        ({"format": {"test_size": 1.5}}, "format.test_size"),
        ({"tokenize": {"max_length": 4}}, "tokenize.max_length"),
    ],
)
def test_bad_values_are_named(tmp_path, overrides, message):
    path = write(tmp_path, deep_merge(default_params(), overrides))
    section = next(iter(overrides))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_section(section, path)


def test_unknown_section_is_refused(tmp_path):
    path = write(tmp_path, {**default_params(), "trian": {"lr": 1}})
    with pytest.raises(ConfigError, match="unknown section.*trian"):
        read_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        read_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_params(bad)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="section train must be a mapping"):
        parse_section("train", [1, 2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
        ({"train": {"warmup": float("inf")}}, "train.warmup: Input should be a finite number"),
        ({"train": {"epochs": float("nan")}}, "train.epochs: Input should be a finite number"),
        ({"base": {"tiny": {"pretrain_lr": float("inf")}}}, "base.tiny.pretrain_lr: Input should be a finite"),
        ({"tokenize": {"max_drop_share": float("nan")}}, "tokenize.max_drop_share: Input should be a finite"),
        ({"format": {"test_size": 1.0}}, "format.test_size: must be a row count (an integer, 0 or more) or a "
                                         "share (a number strictly between 0 and 1), got 1.0; for a row count write 1"),
        ({"format": {"val_size": float("inf")}}, "format.val_size: must be a row count"),
        ({"format": {"test_size": True}}, "format.test_size: expected a number, not a boolean"),
        ({"fetch": {"max_rows": True}}, "fetch.max_rows: expected a number, not a boolean"),
        ({"train": {"seed": False}}, "train.seed: expected a number, not a boolean"),
        ({"fetch": {"path": True}}, "fetch.path: expected a string, not a boolean"),
        ({"fetch": {"path": None}}, "fetch.path is required when fetch.source is file"),
        ({"tokenize": {"max_drop_share": 1.5}}, "tokenize.max_drop_share"),
        ({"fetch": {"columns": {"instruction": "texto", "input": None, "output": "texto"}}},
         "fetch.columns.instruction and fetch.columns.output both name column 'texto'"),
        ({"fetch": {"columns": {"instruction": "q", "input": "q", "output": "a"}}},
         "fetch.columns.instruction and fetch.columns.input both name column 'q'"),
        ({"train": {"max_steps": 0}}, "train.max_steps: must be -1 (run for train.epochs) or a positive number"),
        ({"train": {"max_steps": -2}}, "train.max_steps: must be -1"),
    ],
)
def test_surprising_values_are_refused(tmp_path, overrides, message):
    path = write(tmp_path, deep_merge(default_params(), overrides))
    section = next(iter(overrides))
    with pytest.raises(ConfigError) as info:
        load_section(section, path)
    assert message in str(info.value)
    assert "Value error" not in str(info.value)


def test_split_sizes_keep_their_meaning():
    params = default_params()
    fmt = parse_section("format", {**params["format"], "val_size": 0, "test_size": 0.5})
    assert fmt.val_size == 0 and isinstance(fmt.val_size, int) and fmt.test_size == 0.5
    assert parse_section("format", {**params["format"], "test_size": 1}).test_size == 1
    # A Hub source needs no path; booleans still go where booleans are meant.
    assert parse_section("fetch", {**params["fetch"], "source": "hub", "path": None}).path is None
    assert parse_section("train", {**params["train"], "double_quant": False}).double_quant is False


def test_missing_key_is_named_not_defaulted(tmp_path):
    """params.yaml is the only source of values: a key left out is refused, never filled in."""
    params = default_params()
    del params["train"]["lora"]["dropout"]
    del params["tokenize"]["max_length"]
    path = write(tmp_path, params)
    with pytest.raises(ConfigError, match=r"train\.lora\.dropout: Field required"):
        load_section("train", path)
    with pytest.raises(ConfigError, match=r"tokenize\.max_length: Field required"):
        load_section("tokenize", path)


def test_optimizer_and_scheduler_names_are_transformers_names():
    """config.py lists them without importing transformers (seconds per stage); they must stay valid names."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    train = SECTIONS["train"].model_fields
    assert set(get_args(train["optim"].annotation)) <= {name.value for name in OptimizerNames}
    assert set(get_args(train["lr_scheduler"].annotation)) <= {name.value for name in SchedulerType}


def test_every_key_has_help_text():
    rows = describe_keys()
    assert {key.split(".")[0] for key, _ in rows} == set(SECTIONS)
    assert [key for key, text in rows if not text] == []


def test_explain_prints_each_key(capsys):
    assert main(["check-params", "--explain", "tokenize"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["tokenize.max_length", "tokenize.overlength",
                                                  "tokenize.max_drop_share"]
    assert "drop | truncate" in out[1]
    assert main(["check-params", "--explain", "trian"]) == 2


def test_section_from_params_applies_overrides():
    train = section_from_params("train", {"lr": 0.5, "lora": {"r": 2}}, REPO / "params.yaml")
    assert (train.lr, train.lora.r) == (0.5, 2)
    assert train.lora.alpha == default_params()["train"]["lora"]["alpha"]


def test_a_tracker_must_be_installed(tmp_path, monkeypatch):
    """Checked when params load, so `sabia-ift check-params` finds it before `dvc exp run` removes outputs."""
    import importlib.util

    from sabia_ift.config import TRACKER_PACKAGES, TrainConfig

    tracker = get_args(TrainConfig.model_fields["report_to"].annotation)[0]
    assert set(TRACKER_PACKAGES) == set(get_args(tracker))
    installed: set[str] = {"dvclive"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name in installed else None)
    path = write(tmp_path, deep_merge(default_params(), {"train": {"report_to": ["dvclive", "tensorboard"]}}))
    with pytest.raises(ConfigError) as info:
        load_section("train", path)
    assert str(info.value) == (f"{path}: train.report_to: tensorboard is not installed (no tensorboard or "
                               "tensorboardX package): pip install tensorboard, or remove tensorboard from "
                               "train.report_to")
    installed.add("tensorboardX")  # what transformers' TensorBoard callback also accepts
    assert load_section("train", path).report_to == ["dvclive", "tensorboard"]
