"""Run the pipeline's stages as dvc.yaml writes them and hash every output as DVC does.

For comparing two machines without DVC on either: each stage's `cmd` is read
from dvc.yaml (the one place that names paths) and run in this checkout; each
declared output is hashed the way `dvc.lock` records it (md5 of a file; for a
folder, md5 of the sorted JSON listing of its files' md5s, plus ".dir"). The
JSON it writes has those hashes, every metrics file's content, each stage's wall
time and what the CPU and torch were. Two machines agree when `outs` and
`metrics` are equal.

    python bench/repro_check.py --out bench/results/repro-<machine>.json
    python bench/repro_check.py --stages train evaluate_base evaluate --set train.report_to=[] --out ...

`--set section.key=yaml-value` edits params.yaml in place first (meant for a throwaway
copy of the project, such as a GPU machine's working tree). Runs on the CPU: CUDA is
hidden from the stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STAGES = ["base", "fetch", "format", "tokenize", "train", "evaluate_base", "evaluate"]


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_hash(path: Path) -> str:
    """What dvc.lock records for an output: a file's md5, or a folder's listing hash."""
    if path.is_file():
        return md5_file(path)
    entries = sorted(
        (item.relative_to(path).parts, md5_file(item)) for item in path.rglob("*") if item.is_file()
    )
    listing = [{"md5": md5, "relpath": "/".join(parts)} for parts, md5 in entries]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def cpu_summary() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in wanted if f in flags]}


def apply_sets(sets: list[str]) -> None:
    params_path = ROOT / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    for item in sets:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")


def search_path(root: str) -> str:
    """PYTHONPATH with this checkout first, keeping what the caller had (carried packages)."""
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=DEFAULT_STAGES)
    parser.add_argument("--set", action="append", default=[], help="section.key=value, applied to params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    apply_sets(args.set)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": search_path(str(ROOT))}
    result: dict = {"cpu": cpu_summary(), "python": sys.version.split()[0], "sets": args.set,
                    "wall_s": {}, "outs": {}, "metrics": {}}
    for name in args.stages:
        stage = pipeline[name]
        command = " ".join(stage["cmd"].split()).replace("python ", f"{sys.executable} ", 1)
        start = time.perf_counter()
        done = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
        result["wall_s"][name] = round(time.perf_counter() - start, 1)
        if done.returncode:
            result["failed"] = {"stage": name, "stderr": done.stderr[-4000:]}
            break
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            rel = entry if isinstance(entry, str) else next(iter(entry))
            path = ROOT / rel
            result["outs"][rel] = dvc_hash(path) if path.exists() else None
            if rel.endswith(".json") and path.is_file():
                result["metrics"][rel] = json.loads(path.read_text(encoding="utf-8"))
    probe = subprocess.run(
        [sys.executable, "-c", "from sabia_ift import stage; import torch, json; from sabia_ift.determinism "
         "import describe; print(json.dumps({**describe(), 'torch': torch.__version__}))"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    result["numerics"] = json.loads(probe.stdout) if probe.returncode == 0 else probe.stderr[-1000:]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("cpu", "wall_s", "numerics")}, ensure_ascii=False))
    if "failed" in result:
        print(result["failed"]["stderr"], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
