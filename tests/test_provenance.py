"""What two dvc.lock files say about the base model and data each revision was built from."""

from __future__ import annotations

import copy

import yaml

from conftest import REPO
from sabia_ift.provenance import TRACKED, compare_locks, hub_move

# The pipeline's chain as dvc.lock records it: each stage's code, params and upstream outputs.
CHAIN = {"base": [], "fetch": [], "format": ["data/raw"], "tokenize": ["models/base", "data/formatted"],
         "train": ["models/base", "data/tokenized"]}
OUTS = {"models/base": "1fa5ac8ae72c247a2ab15a2afeb30207.dir", "data/raw": "7c5fb4988569973655073f9a879c954e.dir",
        "data/formatted": "54ed893834bb540c211f3c3c81176d43.dir",
        "data/tokenized": "a1d5eb97196bb71398cd9e0fe13d63e3.dir",
        "models/adapter": "a537403959df20f541328b7285c97dd7.dir"}
PARAMS = {"base": {"source": "tiny", "tiny": {"hidden_size": 128, "seed": 0}}, "fetch": {"max_rows": None},
          "format": {"val_size": 100}, "tokenize": {"max_length": 512}, "train": {"lr": 0.001, "epochs": 4}}


def make_lock(outs: dict | None = None, params: dict | None = None, code: dict | None = None) -> dict:
    """A dvc.lock for the chain; `outs`, `params` and `code` (stage -> its script's md5) change parts of it."""
    outs, params, code = {**OUTS, **(outs or {})}, copy.deepcopy({**PARAMS, **(params or {})}), code or {}
    stages = {}
    for stage, upstream in CHAIN.items():
        deps = [{"path": f"stages/{stage}.py", "hash": "md5", "md5": code.get(stage, f"{stage:0<32}"), "size": 500}]
        deps += [{"path": path, "hash": "md5", "md5": outs[path], "size": 1000, "nfiles": 3} for path in upstream]
        stages[stage] = {"cmd": f"python -m stages.{stage}", "deps": deps,
                         "params": {"params.yaml": {stage: params[stage]}},
                         "outs": [{"path": TRACKED[stage][0], "hash": "md5", "md5": outs[TRACKED[stage][0]]}]}
    return {"schema": "2.0", "stages": stages}


def test_the_same_lock_has_nothing_to_report():
    provenance = compare_locks(make_lock(), make_lock())
    assert provenance.differences == () and not provenance.unexplained and provenance.not_comparable() == ""
    real = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))
    assert compare_locks(real, copy.deepcopy(real)).differences == ()


def test_another_base_with_nothing_changed_is_a_machine_difference():
    """The issue's case: a fresh clone on another CPU built another base; everything after it follows."""
    other = make_lock(outs={"models/base": "5d41402abc4b2a76b9719d911017c592.dir",
                            "data/tokenized": "b" * 32 + ".dir", "models/adapter": "c" * 32 + ".dir"})
    provenance = compare_locks(make_lock(), other)
    assert [d.stage for d in provenance.differences] == ["base", "tokenize", "train"]
    assert [d.stage for d in provenance.unexplained] == ["base"]
    assert provenance.not_comparable() == (
        "the base model differs (hash 1fa5ac8 → 5d41402) while params.base and the base stage's deps are "
        "unchanged — a different machine or library version built it")
    by_stage = {d.stage: d for d in provenance.differences}
    assert by_stage["tokenize"].sentence() == ("the tokenized data changed (hash a1d5eb9 → bbbbbbb) because "
                                               "the base model did")
    assert by_stage["train"].upstream == ("the base model", "the tokenized data")


def test_an_adapter_trained_elsewhere_from_the_same_inputs_is_a_machine_difference_too():
    provenance = compare_locks(make_lock(), make_lock(outs={"models/adapter": "d" * 32 + ".dir"}))
    assert [d.stage for d in provenance.unexplained] == ["train"]
    assert "the tuned adapter differs" in provenance.not_comparable()


def test_a_changed_param_or_script_explains_the_difference():
    changed = make_lock(params={"train": {"lr": 0.004, "epochs": 4}}, outs={"models/adapter": "d" * 32 + ".dir"})
    provenance = compare_locks(make_lock(), changed)
    (train,) = provenance.differences
    assert not provenance.unexplained and train.params == ("train.lr",) and train.on_purpose
    assert train.sentence() == "the tuned adapter changed on purpose (params train.lr; hash a537403 → ddddddd)"

    base = compare_locks(make_lock(), make_lock(code={"base": "e" * 32}, outs={"models/base": "f" * 32 + ".dir"}))
    assert base.base is not None and base.base.inputs == ("stages/base.py",) and not base.unexplained
    assert base.base.sentence().startswith("the base model changed on purpose (stages/base.py; hash")


def test_new_library_versions_explain_every_difference():
    other = make_lock(outs={"models/base": "5d41402abc4b2a76b9719d911017c592.dir"})
    provenance = compare_locks(make_lock(), other, changed_files=["constraints.txt"])
    assert not provenance.unexplained
    assert provenance.base is not None and provenance.base.inputs == ("constraints.txt (library versions)",)


def test_a_hub_branch_that_moved_is_named():
    hub = {"source": "hub", "name_or_path": "maritaca-ai/sabia-7b", "requested_revision": "main"}
    records = ({**hub, "revision": "a082d7feed07a2659a38cc2ddd1952396820365b"},
               {**hub, "revision": "0123456789abcdef0123456789abcdef01234567"})
    asked = []

    def base_records():
        asked.append(True)
        return records

    other = make_lock(outs={"models/base": "5" * 32 + ".dir"})
    provenance = compare_locks(make_lock(), other, base_records=base_records)
    assert provenance.not_comparable() == (
        "the base model differs (maritaca-ai/sabia-7b: branch 'main' a082d7f → 0123456) while params.base is "
        "unchanged — the revision it names is a branch that moved between the two runs: pin a commit")
    # Read only when the lock cannot explain the difference (it is a DVC read at a git revision).
    compare_locks(make_lock(), make_lock(), base_records=base_records)
    assert len(asked) == 1
    # A copied snapshot records its Hub origin; a tiny model has no Hub revision to move.
    assert hub_move({"source": "local_copy", "origin": records[0]}, records[1]).startswith("maritaca-ai/sabia-7b")
    assert hub_move({"source": "tiny"}, {"source": "tiny"}) == ""


def test_a_revision_without_a_lock_is_said_unchecked():
    provenance = compare_locks(None, make_lock(), labels=("main", "this PR"))
    assert provenance.unchecked == "no dvc.lock at main" and not provenance.unexplained


def test_tracked_outputs_are_the_stages_outputs_in_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage, (path, _) in TRACKED.items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stages[stage]["outs"]]
        assert path in outs, (stage, path, outs)
