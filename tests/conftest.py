"""Shared fixtures: a tiny base model, small params, and throwaway copies of the project."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Imported before anything loads torch: it pins the CPU numerics (sabia_ift/determinism.py),
# so the tests compute exactly as the stages they check.
from sabia_ift import stage  # noqa: F401
from sabia_ift.config import merge, section_from_params

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Sizes that keep a whole `dvc repro` near a minute on a 2-core CPU.
FAST_PARAMS = {
    "base": {"tiny": {"pretrain_documents": 200, "pretrain_epochs": 1}},
    "fetch": {"max_rows": 320},
    "format": {"val_size": 24, "test_size": 16},
    "train": {"epochs": 1, "logging_steps": 5, "eval_steps": 10, "save_steps": 10},
    "evaluate": {"max_samples": 16, "max_new_tokens": 16, "samples_to_write": 8},
    "benchmark": {"limit": 8},
}


def deep_merge(base: dict, overrides: dict) -> dict:
    return copy.deepcopy(merge(base, overrides))


def params_for(section: str, **overrides):
    """A section's config as params.yaml sets it, with some values changed.

    `base.tiny` names the nested tiny-model section.
    """
    if section == "base.tiny":
        return section_from_params("base", {"tiny": overrides}, REPO / "params.yaml").tiny
    return section_from_params(section, overrides, REPO / "params.yaml")


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def write_params(project: Path, overrides: dict) -> None:
    params = deep_merge(yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8")), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def project_env(home: Path) -> dict[str, str]:
    """Offline, with its own HF cache, and this interpreter's tools first on PATH."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    env.pop("PYTHONPATH", None)
    return env


def tracked_files() -> list[str]:
    """What a clone would hold, plus uncommitted work: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    skip = ("tests/", "metrics/", "dvc.lock", "BENCHMARKS", "README", "bench/", ".github/")
    return [f for f in out if f and not f.startswith(skip) and (REPO / f).is_file()]


def make_project(dest: Path, overrides: dict | None = None, *, git: bool = True) -> Path:
    """A fresh copy of the project (no outputs, no lock), as a committed git repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    if overrides:
        write_params(dest, overrides)
    if git:
        env = project_env(dest)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "project copy"]):
            subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1800,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env={**project_env(cwd), **(env or {})}, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_shared(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this run sees (each worker's basetemp sits in it)."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


def build_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test run, by whichever worker asks first, under a lock."""
    from filelock import FileLock

    shared = run_shared(tmp_path_factory)
    out = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.done").is_file():
            shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
            build(out)
            (shared / f"{name}.done").touch()
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny base model folder (as the base stage writes it), lightly pretrained, built once per run."""
    from sabia_ift.toy.tiny_model import build_tiny_model

    return build_once(tmp_path_factory, "tiny-base", lambda out: build_tiny_model(
        params_for("base.tiny", pretrain_documents=200, pretrain_epochs=1), out))


# An HF token in the environment of the shared project's `dvc repro`: no output may hold it.
SECRET = "hf_TestTokenThatMustNeverBeWritten"
# The shell settings that would change torch's and MKL's arithmetic if the stages did not pin them
# (test_determinism): the shared project is built under "a", a fresh one under "b" must match it.
CPU_SETTINGS = {"a": {"PYTHONHASHSEED": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"},
                "b": {"PYTHONHASHSEED": "2", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"}}


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """A FAST_PARAMS copy of the project after a whole `dvc repro` (nothing committed), built once per run.

    Read it, or `copy_project` it before changing anything: every pipeline test starts from
    the same build instead of running base, fetch, format and tokenize again.
    """
    def build(out: Path) -> None:
        project = make_project(out / "sabia-ift", FAST_PARAMS)
        run(["dvc", "repro"], project, env={"HF_TOKEN": SECRET, **CPU_SETTINGS["a"]})

    return build_once(tmp_path_factory, "built-project", build) / "sabia-ift"


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` ran, from its output."""
    return set(re.findall(r"Running stage '(\w+)'", output))


def copy_project(built: Path, dest: Path) -> Path:
    """A private copy of a built project (git history, DVC cache and outputs), at `dest`."""
    shutil.copytree(built, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from sabia_ift.modeling import load_tokenizer

    return load_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def offline_metric(tmp_path_factory):
    """Loads the project's local metrics with evaluate offline and any network access refused."""
    import socket

    import evaluate

    from sabia_ift.evaluation.metrics import load_metric

    # One modules cache per session (basetemp): evaluate imports cached modules
    # under a fixed package name, so a second cache folder in one process would
    # be shadowed by the first. evaluate reads its env vars at import time, so
    # its config attributes are patched too.
    hf_home = tmp_path_factory.getbasetemp() / "hf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_EVALUATE_OFFLINE", "1")
        mp.setenv("HF_MODULES_CACHE", str(hf_home / "modules"))
        mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", hf_home / "modules")
        mp.setattr(evaluate.config, "HF_METRICS_CACHE", hf_home / "metrics")

        def refuse(*args, **kwargs):
            raise OSError("network access attempted in an offline metric test")

        mp.setattr(socket.socket, "connect", refuse)
        yield lambda name: load_metric(name, keep_in_memory=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test may reach the Hub; metric modules load from a private cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


def tokenized_split(root: Path, tokenizer, rows: int, train: int, val: int, test: int | None = None) -> Path:
    """The first `rows` sample rows, cleaned, cut in order into train, val and test (the rest
    when `test` is None), and tokenized (max_length 256) into `root/tokenized`."""
    from sabia_ift.data.formatting import clean_rows
    from sabia_ift.data.tokenization import tokenize
    from sabia_ift.io import write_jsonl
    from sabia_ift.toy.sample import generate_rows

    kept, _ = clean_rows([{**r, "source_row": i + 1} for i, r in enumerate(generate_rows(0)[:rows])])
    end = None if test is None else train + val + test
    for split, part in (("train", kept[:train]), ("val", kept[train:train + val]), ("test", kept[train + val:end])):
        write_jsonl(root / f"{split}.jsonl", part)
    tokenize(params_for("tokenize", max_length=256), tokenizer, 2048, root, root / "tokenized")
    return root / "tokenized"


def save_lora_adapter(base_dir: Path, folder: Path, *, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                      quantization: str = "none", random_scale: float | None = None) -> Path:
    """An untrained LoRA adapter on `base_dir`, saved with its TrainMeta as the train stage saves one.

    `random_scale` None: peft's own start (B zero, so tuned equals base) on the fp32 base; 0: peft's
    random non-zero start (seeded); a number: every LoRA weight drawn from N(0, scale^2), seeded, so
    tuned clearly differs from base. `quantization` nf4 builds it on the 4-bit base, as QLoRA does.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from sabia_ift.artifacts import TrainMeta
    from sabia_ift.modeling import load_model

    four_bit = quantization != "none"
    model = load_model(base_dir, quantization=quantization, double_quant=four_bit, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                                            init_lora_weights=random_scale is None))
    if random_scale:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * random_scale)
    peft.save_pretrained(str(folder))
    if four_bit:
        meta = TrainMeta(quantization=quantization, double_quant=True, precision="auto",
                         base={"name_or_path": str(base_dir)})
    else:
        meta = TrainMeta(quantization="none", double_quant=False, precision="fp32", base={})
    meta.write(folder)
    return folder


def peft_model(base, targets, r: int, *, b_std: float, dropout: float = 0.0):
    """peft's LoRA (alpha 2r) on `base`, its B drawn from N(0, b_std^2) after seeding: peft starts B
    at zero, which would hide a wrong B path and leave A without a gradient."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets),
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=b_std)
    return model


@pytest.fixture(scope="session")
def tuned_adapter(tiny_base, tokenizer, tmp_path_factory) -> Path:
    """An adapter on `tiny_base` trained just enough to stop at EOS (about 30 s on 2 CPU cores).

    Its answers are poor, but they end with EOS where the base's never do,
    which is what the chat and export tests need to tell the two apart.
    """
    from sabia_ift.train.training import train

    root = tmp_path_factory.mktemp("tuned")
    tokenized = tokenized_split(root, tokenizer, 300, 256, 16, 16)
    cfg = params_for("train", epochs=1, lr=3e-3, logging_steps=10, eval_steps=1000, save_steps=1000, report_to=[],
                      lora={"r": 8, "alpha": 16, "dropout": 0.0,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]})
    train(cfg, tiny_base, tokenized, root / "adapter", root / "checkpoints", None)
    return root / "adapter"


# The modules that run DVC pipelines or training processes, in the order pytest-xdist hands
# them out (loadscope keeps a module on one worker; --no-loadscope-reorder in the Makefile keeps
# this order). Each worker starts with two modules: the first takes test_pipeline.py (the one
# full default run, the longest module) and a shorter one; the second the modules that need
# the shared FAST build (it builds it). The many short modules fill in behind.
LONG_MODULES = ("test_pipeline.py", "test_reruns.py", "test_bad_input.py", "test_report.py",
                "test_resume.py", "test_distributed.py", "test_determinism.py", "test_export.py",
                "test_benchmark.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: tests keep their order inside a module
