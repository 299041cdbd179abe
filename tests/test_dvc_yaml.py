"""dvc.yaml declares what each stage really depends on, so `dvc repro` reruns exactly what a change touches."""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
# These shape error messages and logs, never an output: a change to them need not rerun anything.
NO_OUTPUT_EFFECT = {"sabia_ift/errors.py", "sabia_ift/stage.py", "sabia_ift/__init__.py", "sabia_ift/cost.py"}


def local_imports(path: Path) -> set[Path]:
    """sabia_ift modules a file imports, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, inside sabia_ift
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                module = base.joinpath(*(node.module or "").split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == "sabia_ift":
                module = REPO.joinpath(*node.module.split("."))
            else:
                continue
            names = [module / alias.name for alias in node.names] + [module]
            for candidate in names:
                for file in (candidate.with_suffix(".py"), candidate / "__init__.py"):
                    if file.is_file():
                        found.add(file)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sabia_ift":
                    file = REPO.joinpath(*alias.name.split(".")).with_suffix(".py")
                    if file.is_file():
                        found.add(file)
    return found


def closure(start: Path) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(local_imports(current))
        if (current.name == "__init__.py" and current.parent.name == "metrics"
                and current.parent.parent.name == "evaluation"):
            todo.extend(current.parent.glob("*/*.py"))  # metric modules load by path, not by import
    return {str(p.relative_to(REPO)) for p in seen}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_imported_module_is_a_dependency(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[2]  # python -m stages.<name> ...
    needed = closure(REPO / (script.replace(".", "/") + ".py")) - NO_OUTPUT_EFFECT
    deps = [str(d) for d in stage["deps"]]
    missing = [m for m in needed if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them as deps"


# The base model's half of a stage: its section, and the train.* keys that decide how the base is
# loaded (config.base_loading), never the rest of train (an lr change must not rerun them).
BASE_STAGES = {"evaluate_base": "evaluate", "benchmark_base": "benchmark"}
LOADING_PARAMS = ["train.quantization", "train.double_quant", "train.precision"]
# Keys a stage reads from another stage's section, each declared in its params: the contamination
# check reads the benchmark's items as the benchmark stage does.
BORROWED = {"contamination": {"benchmark": ["benchmark.tasks", "benchmark.seed"]}}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_reads_only_its_own_params_section(name):
    stage = STAGES[name]
    section = BASE_STAGES.get(name, name)
    borrowed = BORROWED.get(name, {})
    assert stage["params"] == [section] + (LOADING_PARAMS if name in BASE_STAGES else []) \
        + [key for keys in borrowed.values() for key in keys]
    script = (REPO / "stages" / f"{name}.py").read_text()
    assert f'load_section("{section}"' in script
    assert all(f'load_section("{other}"' in script for other in borrowed)
    assert script.count("load_section(") == 1 + len(borrowed)
    assert ("base_loading(" in script) == (name in BASE_STAGES)


def test_the_loading_params_are_the_ones_base_loading_reads():
    from sabia_ift.artifacts import LOADING_KEYS

    assert [f"train.{key}" for key in LOADING_KEYS] == LOADING_PARAMS


@pytest.mark.parametrize("name", list(BASE_STAGES))
def test_base_stages_never_read_the_adapter(name):
    deps = [str(d) for d in STAGES[name]["deps"]]
    assert "models/adapter" not in deps and "models/base" in deps
    tuned = BASE_STAGES[name]
    # The tuned stage reads every output of the base one.
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in STAGES[name]["outs"]]
    assert set(outs) <= set(STAGES[tuned]["deps"])


def test_the_closure_finds_function_level_imports():
    # training.py imports modeling at module level and nothing from report: a sanity check that can fail.
    found = closure(REPO / "sabia_ift" / "train" / "training.py")
    assert "sabia_ift/modeling.py" in found and "sabia_ift/report.py" not in found


def test_bytecode_never_counts_in_a_deps_hash(tmp_path):
    """A queued experiment's fresh copy has no __pycache__: with it in a folder dep's hash, the stage reran."""
    from dvc.repo import Repo

    folders = sorted({dep for stage in STAGES.values() for dep in stage.get("deps", [])
                      if (REPO / dep).is_dir() and dep.startswith("sabia_ift")})
    assert "sabia_ift/toy" in folders and "sabia_ift/train" in folders
    ignore = Repo(str(REPO), uninitialized=True).dvcignore
    for folder in folders:
        for name in ("__pycache__/tiny_model.cpython-311.pyc", "module.pyc"):
            path = str(REPO / folder / name)
            assert ignore.is_ignored_file(path), path
        assert not ignore.is_ignored_file(str(REPO / folder / "__init__.py"))
