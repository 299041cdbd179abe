"""`sabia-ift` commands: clear errors for missing models, paths found from a subfolder of the repository."""

import json

from sabia_ift.artifacts import TRAIN_META
from sabia_ift.cli import in_repo, main


def test_generate_outside_the_repository_says_not_found(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "Olá", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "models/adapter: no such adapter folder" in err and "corrupt" not in err

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / TRAIN_META).write_text(json.dumps(
        {"quantization": "none", "double_quant": False, "precision": "fp32", "base": {}}))
    assert main(["generate", "Olá", "--device", "cpu", "--adapter", str(adapter)]) == 2
    assert "models/base: no such base model folder" in capsys.readouterr().err


def test_paths_resolve_from_a_subfolder_of_the_repository(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "models" / "adapter").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path / "docs")
    assert in_repo("models/adapter") == tmp_path / "models" / "adapter"
    assert str(in_repo("models/base")) == "models/base"  # missing everywhere: as given, for the error
    assert in_repo(str(tmp_path / "x")) == tmp_path / "x"
