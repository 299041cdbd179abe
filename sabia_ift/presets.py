"""Presets: named sets of differences from params.yaml, run as DVC experiments.

A preset file (presets/NAME.yaml) has the shape of params.yaml but holds only the
keys whose values differ. `sabia-ift run-preset NAME` runs it with
`dvc exp run --temp -S key=value ...`: the experiment runs in a temporary copy
and is recorded as a DVC experiment, so the workspace stays on the embedded
default (`dvc exp show`, then `dvc exp branch` or `dvc exp apply` to keep it).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .config import SECTIONS, merge, parse_section, read_params
from .errors import ConfigError


def preset_path(name: str, root: str | Path = ".") -> Path:
    """A path to a preset file, or the name of one under presets/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return Path(root) / "presets" / f"{name}.yaml"


def load_preset(name: str, params: str | Path = "params.yaml") -> dict[str, Any]:
    """The preset's differences, checked: merged over `params` every section must validate."""
    path = preset_path(name, Path(params).parent)
    try:
        diff = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{path}: no such preset; known: {', '.join(known) or 'none'}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(diff, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(diff).__name__}")
    unknown = sorted(set(diff) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    merged = merge(read_params(params), diff)
    for section in SECTIONS:
        parse_section(section, merged.get(section), f"{path} over {params}")
    return diff


def _value(value: Any) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:  # the grammar wants 1e-5, not Python's 1e-05
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, list):
        return "[" + ",".join(_value(item) for item in value) + "]"
    # Quoted, so a sha of digits or a word like `null` stays a string.
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_args(diff: dict[str, Any], prefix: str = "") -> list[str]:
    """`-S key=value` arguments for every leaf of the preset."""
    args = []
    for key, value in diff.items():
        if isinstance(value, dict):
            args.extend(set_args(value, f"{prefix}{key}."))
        else:
            args.extend(["-S", f"{prefix}{key}={_value(value)}"])
    return args


def exp_run_command(name: str, diff: dict[str, Any], extra: list[str]) -> list[str]:
    # --temp runs in a copy under .dvc/tmp/exps: `dvc exp run` in the workspace
    # would leave params.yaml, dvc.lock and the outputs on the preset.
    mode = [] if "--queue" in extra else ["--temp"]
    named = [] if {"-n", "--name"} & set(extra) else ["--name", Path(name).stem]
    return ["dvc", "exp", "run", *mode, *named, *set_args(diff), *extra]


def run_preset(name: str, params: str | Path, extra: list[str]) -> int:
    cmd = exp_run_command(name, load_preset(name, params), extra)
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode
