"""Wheels for the GPU benchmarks on a CUDA machine that cannot reach a package index.

    python bench/offline_wheels.py DIR [--python 3.12] [--cuda 130] [NAME ...]

Downloads, at the versions constraints.txt pins, the packages the benchmarks
import that a CUDA image with torch and transformers often lacks (or holds at
other versions), as wheels for CPython --python on x86-64 Linux, without their
dependencies (the list names them). Packages published only as source are built
here, and must come out pure Python. bitsandbytes ships one CUDA library per CUDA
version (43 MB in all): only --cuda's is kept. On the CUDA machine:

    pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD

Unsloth, for the side-by-side's peer rows, is not pinned here: add it and its
own dependencies by name.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The train, evaluate and benchmark stages' imports beyond torch, and lm-eval's.
PACKAGES = (
    "transformers", "tokenizers", "huggingface-hub", "peft", "bitsandbytes", "liger-kernel",
    # huggingface-hub 2's HTTP client, which a CUDA image with an older hub lacks.
    "httpx2", "httpcore2", "h11", "anyio", "truststore",
    "datasets", "dill", "multiprocess", "fsspec", "evaluate",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "lm-eval", "sqlitedict", "word2number", "more-itertools", "rouge-score", "nltk", "regex",
    "pytablewriter", "dataproperty", "mbstrdecoder", "pathvalidate", "tabledata", "tcolorpy", "typepy", "chardet",
)
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: Path) -> dict[str, str]:
    out = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[normalise(name)] = version.split(";")[0].strip()
    return out


def keep_one_cuda_library(wheel: Path, cuda: str) -> int:
    """Drop every libbitsandbytes_cuda*.so but `cuda`'s from the wheel (and its RECORD); bytes saved."""
    other = re.compile(rf"libbitsandbytes_cuda(?!{cuda}\.)\d+\.so$")
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if other.search(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [r for r in data.decode().splitlines() if not other.search(r.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(item, data)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="*", help="packages to fetch (default: the benchmarks' list above)")
    parser.add_argument("--python", default="3.12", help="the CUDA machine's Python version")
    parser.add_argument("--cuda", default="130", help="the bitsandbytes CUDA library to keep (130 = CUDA 13.0)")
    args = parser.parse_args()

    pinned = pins(REPO / "constraints.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name in args.names or PACKAGES:
        version = pinned.get(normalise(name))
        if version is None:
            raise SystemExit(f"{name}: not pinned in constraints.txt")
        spec = f"{name}=={version}"
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        binary = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", args.python,
                  "--implementation", "cp", *platforms, "-d", str(args.out), spec]
        if subprocess.call(binary, stderr=subprocess.DEVNULL) == 0:
            continue
        # Published as source only: build it here; a compiled result would not run there.
        subprocess.check_call([*pip, "wheel", "--no-deps", "-w", str(args.out), spec])
        built = sorted(args.out.glob(f"{re.sub(r'[-.]+', '_', name)}-{version}-*.whl"), key=lambda p: p.name.lower())
        if not built or not built[0].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{spec}: no wheel for CPython {args.python}, and the source build is not pure Python")
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        saved = keep_one_cuda_library(wheel, args.cuda)
        print(f"{wheel.name}: kept libbitsandbytes_cuda{args.cuda}.so, {saved / 1e6:.0f} MB smaller")
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 1e6:.0f} MB in {args.out}")


if __name__ == "__main__":
    main()
