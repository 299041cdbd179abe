"""Whether two revisions' results were built from the same base model and data, read from their dvc.lock.

dvc.lock records, per stage, the hash of each output and of everything the
stage read: its params, its code and its input files. When an output differs
between two revisions, the lock says why: a param or a file the stage reads
changed (on purpose), or an upstream output did, or nothing did. Nothing
changed and yet another base model came out: another machine or another
library version built it, and the tuned models' scores then differ by that,
not by the change under review; the report says so instead of a verdict
(a paired bootstrap resamples prompts, never machines).

Pure: parsed lock files in, a `Provenance` out; report.py reads the revisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# The outputs whose differences make two tuned models incomparable, with the stage that builds each.
# Must match dvc.yaml (tests/test_provenance.py checks it).
TRACKED = {"base": ("models/base", "the base model"),
           "fetch": ("data/raw", "the raw data"),
           "format": ("data/formatted", "the formatted data"),
           "tokenize": ("data/tokenized", "the tokenized data"),
           "train": ("models/adapter", "the tuned adapter")}


def short(digest: str) -> str:
    return digest.removesuffix(".dir")[:7]


def _digest(entry: dict) -> str | None:
    # DVC 3 writes `hash: md5` beside `md5`; an import or a remote dep may carry an etag or checksum.
    for key in ("md5", "etag", "checksum"):
        if entry.get(key):
            return str(entry[key])
    return None


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, object] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def _params(stage: dict) -> dict[str, object]:
    flat: dict[str, object] = {}
    for file, values in (stage.get("params") or {}).items():
        for key, value in _flatten(values or {}).items():
            flat[key if file == "params.yaml" else f"{file}:{key}"] = value
    return flat


def _changed(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


@dataclass(frozen=True)
class Difference:
    """One tracked output that differs between the revisions, and what its stage read that changed."""

    stage: str
    words: str
    before: str
    after: str
    params: tuple[str, ...] = ()  # dotted params keys of the stage that changed
    inputs: tuple[str, ...] = ()  # its files (code, data), command or library pins that changed
    upstream: tuple[str, ...] = ()  # tracked outputs it reads that differ too (their words)
    moved: str = ""  # a Hub branch that resolved to another commit: "org/name: branch 'main' abc1234 → def5678"

    @property
    def unexplained(self) -> bool:
        """Nothing the stage read changed, yet its output did: another machine or library built it."""
        return not (self.params or self.inputs or self.upstream)

    @property
    def on_purpose(self) -> bool:
        return bool(self.params or self.inputs)

    @property
    def hashes(self) -> str:
        return f"hash {short(self.before)} → {short(self.after)}"

    def sentence(self) -> str:
        if self.moved:
            return (f"{self.words} differs ({self.moved}) while params.{self.stage} is unchanged — the "
                    f"revision it names is a branch that moved between the two runs: pin a commit")
        if self.unexplained:
            return (f"{self.words} differs ({self.hashes}) while params.{self.stage} and the {self.stage} "
                    "stage's deps are unchanged — a different machine or library version built it")
        causes = ([f"params {', '.join(self.params)}"] if self.params else []) + list(self.inputs)
        if causes:
            return f"{self.words} changed on purpose ({'; '.join(causes)}; {self.hashes})"
        return f"{self.words} changed ({self.hashes}) because {' and '.join(self.upstream)} did"


@dataclass(frozen=True)
class Provenance:
    differences: tuple[Difference, ...] = ()
    unchecked: str = ""  # why the locks could not be compared, if they could not

    @property
    def unexplained(self) -> list[Difference]:
        return [d for d in self.differences if d.unexplained]

    @property
    def base(self) -> Difference | None:
        return next((d for d in self.differences if d.stage == "base"), None)

    def not_comparable(self) -> str:
        """Why the tuned models cannot be compared ('' when they can): every output that differs alone."""
        return "; ".join(d.sentence() for d in self.unexplained)


def hub_move(before: dict | None, after: dict | None) -> str:
    """'org/name: branch 'main' abc1234 → def5678' when both base.json records name one Hub model at
    the same requested revision but hold different commits; '' otherwise."""
    def hub(info: dict | None) -> dict | None:
        if info and info.get("source") == "local_copy":
            info = info.get("origin")  # weights copied into models/base: the record of where from
        return info if info and info.get("source") == "hub" else None

    old, new = hub(before), hub(after)
    if not old or not new or old.get("name_or_path") != new.get("name_or_path"):
        return ""
    if old.get("revision") == new.get("revision"):
        return ""
    requested = old.get("requested_revision") or ""
    return (f"{old['name_or_path']}: {'branch ' + repr(requested) + ' ' if requested else ''}"
            f"{str(old.get('revision'))[:7]} → {str(new.get('revision'))[:7]}")


def compare_locks(before: dict | None, after: dict | None, *, changed_files: Iterable[str] = (),
                  base_records: Callable[[], tuple[dict | None, dict | None]] | None = None,
                  labels: tuple[str, str] = ("base", "head")) -> Provenance:
    """What differs between two parsed dvc.lock files among TRACKED outputs, and why.

    `changed_files`: files outside every stage's deps that shape all of them and differ
    between the revisions (constraints.txt: the library versions). `base_records`, called
    only when the base model differs for no reason the lock shows, gives both revisions'
    models/base/base.json, to tell a moved Hub branch from a machine difference.
    """
    missing = [label for label, lock in zip(labels, (before, after)) if not (lock or {}).get("stages")]
    if missing:
        return Provenance(unchecked=f"no dvc.lock at {' and '.join(missing)}")
    old_stages, new_stages = before["stages"], after["stages"]  # type: ignore[index]
    # A changed dep that is a tracked output is upstream, not something the stage was given.
    produced = dict(TRACKED.values())
    libraries = tuple(f"{name} (library versions)" for name in changed_files)
    found: dict[str, Difference] = {}
    for stage, (path, words) in TRACKED.items():
        old, new = old_stages.get(stage), new_stages.get(stage)
        if not old or not new:
            continue
        digests = [next((_digest(o) for o in s.get("outs") or [] if o.get("path") == path), None) for s in (old, new)]
        if None in digests or digests[0] == digests[1]:
            continue
        deps = [{d["path"]: _digest(d) for d in s.get("deps") or []} for s in (old, new)]
        changed_deps = _changed(*deps)
        upstream = tuple(what for out, what in produced.items() if out in changed_deps)  # pipeline order
        inputs = [p for p in changed_deps if p not in produced]
        if old.get("cmd") != new.get("cmd"):
            inputs.append(f"the {stage} stage's command")
        found[stage] = Difference(stage, words, str(digests[0]), str(digests[1]),
                                  params=tuple(_changed(_params(old), _params(new))),
                                  inputs=tuple(inputs) + libraries, upstream=upstream)
    base = found.get("base")
    if base is not None and base.unexplained and base_records is not None:
        moved = hub_move(*base_records())
        if moved:
            found["base"] = Difference(base.stage, base.words, base.before, base.after, moved=moved)
    return Provenance(tuple(found.values()))
