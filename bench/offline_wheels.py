"""Wheels for the GPU benchmarks on a CUDA machine that cannot reach a package index.

    python bench/offline_wheels.py DIR [--python 3.12] [--cuda 130] [NAME ...]
    python bench/offline_wheels.py DIR --peer unsloth

Downloads, at the versions constraints.txt pins, the packages the benchmarks
import that a CUDA image with torch and transformers often lacks (or holds at
other versions), as wheels for CPython --python on x86-64 Linux, without their
dependencies (the list names them). Packages published only as source are built
here, and must come out pure Python. bitsandbytes ships one CUDA library per CUDA
version (43 MB in all): only --cuda's is kept. On the CUDA machine:

    pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD

--peer unsloth fetches, into another folder PEERDIR, the set the side-by-side's
Unsloth rows run on: Unsloth at the version those rows were measured with and
its dependencies that a CUDA image lacks (19 MB, with Unsloth's web UI left out
of its wheel). Unsloth supports transformers only up to 5.17, so it runs on the
image's own transformers, from a folder of its own, with bitsandbytes, pydantic
and datasets' helpers taken from DIR (SHARED_WITH_PEER below):

    pip install --no-index --no-deps --target /tmp/peer PEERDIR/*.whl \
        DIR/{bitsandbytes,pydantic,pydantic_core,annotated_types,typing_inspection,dill,multiprocess,fsspec}-*.whl
    PEER_PYTHONPATH=/tmp/peer python bench/side_by_side.py ...
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
    # The CUDA tests (pytest tests/test_decoding.py there): the test model's tokenizer file comes
    # with mistral-common, whose import needs nothing else.
    "mistral-common", "pytest", "pluggy", "iniconfig",
)
# Not this project's dependencies, so pinned here rather than in constraints.txt: the versions the
# side-by-side's Unsloth rows ran on since 2026-11-27 (trl and datasets within Unsloth's bounds).
PEERS = {
    "unsloth": {
        "unsloth": "2026.10.9", "unsloth-zoo": "2026.10.9", "trl": "1.15.0", "datasets": "4.8.5",
        "torchao": "0.18.0", "cut-cross-entropy": "25.1.1", "tyro": "1.0.17", "docstring-parser": "0.18.0",
        "typeguard": "4.6.1", "shtab": "1.13.0", "msgspec": "0.23.0", "hf-transfer": "0.1.9",
        "sentencepiece": "0.2.3", "einops": "0.8.2", "typer": "0.29.2", "click": "8.5.1", "shellingham": "1.5.4",
        "rich": "15.0.0", "markdown-it-py": "4.3.0", "mdurl": "0.1.2", "pygments": "2.21.0",
        "structlog": "26.1.0", "json5": "0.17.3", "nest-asyncio": "1.6.0", "certifi": "2026.10.19.post1",
        "psutil": "7.2.2", "protobuf": "7.36.2", "xxhash": "4.1.0",
    },
}
# What a peer also needs from the project's own set (its pins, the same wheels): installed from
# that folder into the peer's, so the two sets fit one 64 MiB transfer together.
SHARED_WITH_PEER = ("bitsandbytes", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
                    "dill", "multiprocess", "fsspec")
# Files a wheel carries that nothing here reads: Unsloth's web UI (26 MB), mistral-common's
# tokenizers but the one the test model uses (33 MB unpacked), lm-eval's own task folders (9 MB;
# the benchmark stage reads only the project's task files).
DROP = {"unsloth": re.compile(r"^studio/"),
        "mistral_common": re.compile(r"^mistral_common/data/(?!tokenizer\.model\.v1$)"),
        "lm_eval": re.compile(r"^lm_eval/tasks/[^/]+/")}
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
    return drop_from_wheel(wheel, re.compile(rf"libbitsandbytes_cuda(?!{cuda}\.)\d+\.so$"))


def drop_from_wheel(wheel: Path, other: re.Pattern) -> int:
    """Drop the files whose path `other` matches from the wheel and from its RECORD; bytes saved."""
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
    parser.add_argument("--peer", choices=sorted(PEERS), help="fetch this peer's set instead of the project's")
    args = parser.parse_args()

    pinned = pins(REPO / "constraints.txt")
    if args.peer:
        pinned |= {name: version for name, version in PEERS[args.peer].items() if version}
    names = args.names or (list(PEERS[args.peer]) if args.peer else PACKAGES)
    args.out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name in names:
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
    for prefix, pattern in DROP.items():
        for wheel in args.out.glob(f"{prefix}-*.whl"):
            saved = drop_from_wheel(wheel, pattern)
            print(f"{wheel.name}: {pattern.pattern} left out, {saved / 1e6:.0f} MB smaller")
    if args.peer:
        shared = " ".join(f"DIR/{name}-*.whl" for name in SHARED_WITH_PEER)
        print(f"install with the project's set DIR: pip install --no-index --no-deps --target /tmp/peer "
              f"{args.out}/*.whl {shared}")
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 1e6:.0f} MB in {args.out}")


if __name__ == "__main__":
    main()
