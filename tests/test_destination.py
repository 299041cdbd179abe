"""A folder a command writes: never the project's own, never over files without --overwrite, whole or not at all."""

from __future__ import annotations

import os

import pytest

from sabia_ift.destination import check_destination, new_folder, pipeline_paths
from sabia_ift.errors import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "models" / "adapter").mkdir(parents=True)
    (root / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: x\n    deps: [data/in.jsonl, '${fetch.path}']\n"
        "    outs: [models/adapter, {models/checkpoints: {persist: true}}]\n"
        "    metrics: [{metrics/train.json: {cache: false}}]\n")
    monkeypatch.chdir(root)
    return root


def test_pipeline_paths_are_every_path_dvc_yaml_names(project):
    assert pipeline_paths(project) == ["data/in.jsonl", "models/adapter", "models/checkpoints", "metrics/train.json"]


@pytest.mark.parametrize(("out", "why"), [
    (".", "it is the project root"),
    ("..", "it holds the project root"),
    ("models", "it holds models/adapter, which dvc.yaml names"),
    ("models/checkpoints/x", "it is inside models/checkpoints, which dvc.yaml names"),
    ("metrics/merged", "it is inside metrics/, the project's metrics"),
    ("elsewhere/../models/adapter", "it is models/adapter, which dvc.yaml names"),
    ("reads", "it is reads, the folder it reads"),
    ("link", "it holds models/adapter, which dvc.yaml names"),  # a link to models/
])
def test_protected_folders_are_refused_even_with_overwrite(project, out, why):
    (project / "reads").mkdir()
    os.symlink(project / "models", project / "link")
    with pytest.raises(ConfigError, match=f"--merged {out}: refused, even with --overwrite: {why};"):
        check_destination(out, flag="--merged", overwrite=True, reads={"the folder it reads": "reads"})


def test_home_folder_is_refused(project):
    with pytest.raises(ConfigError, match="it is your home folder"):
        check_destination("~", flag="--merged", overwrite=True, reads={})


def test_new_empty_or_overwritten_folders_are_allowed(project):
    assert check_destination("models/merged", flag="--merged", overwrite=False, reads={}) == \
        project / "models" / "merged"
    (project / "empty").mkdir()
    assert check_destination("empty", flag="--merged", overwrite=False, reads={}) == project / "empty"
    (project / "full").mkdir()
    (project / "full" / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--merged full: exists and is not empty; nothing is deleted"):
        check_destination("full", flag="--merged", overwrite=False, reads={})
    assert check_destination("full", flag="--merged", overwrite=True, reads={}) == project / "full"


def test_a_failed_write_leaves_nothing_and_a_finished_one_follows_the_umask(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(KeyboardInterrupt), new_folder(target) as tmp:
        (tmp / "weights").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # no temporary, no parent folders it made
    mask = os.umask(0o077)
    try:
        with new_folder(target) as tmp:
            (tmp / "weights").write_bytes(b"x")
            os.chmod(tmp / "weights", 0o600)
    finally:
        os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o700 and (target / "weights").stat().st_mode & 0o777 == 0o600
    with new_folder(target) as tmp:
        os.chmod(tmp / ".", 0o700)
        (tmp / "weights").write_bytes(b"y")
        os.chmod(tmp / "weights", 0o600)
    assert (target / "weights").read_bytes() == b"y"
    assert (target / "weights").stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
