"""A train stage killed with SIGKILL resumes from its last checkpoint on the next `dvc repro`."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST_PARAMS, copy_project, deep_merge, project_env, run, write_params
from sabia_ift.artifacts import CHECKPOINTS_NOTE

pytestmark = pytest.mark.slow

PARAMS = deep_merge(FAST_PARAMS, {"train": {"epochs": 2, "save_steps": 8, "eval_steps": 16, "logging_steps": 4}})


def wait_for_checkpoint(project, proc, min_step: int, log: Path, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"the stage ended (exit {proc.returncode}) before it could be interrupted:\n{tail}")
        steps = [int(p.name.split("-")[1]) for p in (project / "models/checkpoints").glob("checkpoint-*")
                 if (p / "trainer_state.json").is_file()]
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def processes_in(folder) -> list[int]:
    """Processes whose working directory is `folder` (the stage runs there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == Path(folder):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "two-processes-ddp"])
def test_sigkill_then_repro_resumes_and_matches_an_uninterrupted_run(tmp_path, built_project, devices):
    """Two processes: the stage relaunched under torchrun (gloo on CPU), the launcher killed."""
    layout = {"devices": devices, "device": "cpu"} if devices == 1 else \
        {"devices": 2, "device": "cpu", "micro_batch_size": 4, "grad_accum": 2}
    # The shared build's data and base; only train's params differ, so only train reruns.
    project = copy_project(built_project, tmp_path / "sabia-ift")
    write_params(project, deep_merge(PARAMS, {"train": layout}))
    assert "up to date" in run(["dvc", "status", "tokenize"], project).stdout

    log = tmp_path / "interrupted.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=project_env(project),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        step = wait_for_checkpoint(project, proc, min_step=16, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a stage that already ended has no group left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    # No process (a torchrun worker included) outlived the kill to go on writing here.
    assert processes_in(project) == []
    assert not (project / "models/adapter").exists()  # nothing that looks finished

    resumed = run(["dvc", "repro", "train"], project)
    assert "resuming from" in resumed.stderr + resumed.stdout
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["resumed_from_step"] >= step
    adapter = load_file(project / "models/adapter/adapter_model.safetensors")
    curve = (project / "metrics/curves/plots/metrics/train/loss.tsv").read_text()
    assert [p.name for p in (project / "models/checkpoints").iterdir()] == [CHECKPOINTS_NOTE]

    run(["dvc", "repro", "--force", "train"], project)  # from scratch, uninterrupted
    fresh = json.loads((project / "metrics/train.json").read_text())
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == metrics["steps"]
    for key in ("train_loss", "final_train_loss", "eval_loss"):
        assert metrics[key] == pytest.approx(fresh[key], rel=1e-4), key
    fresh_adapter = load_file(project / "models/adapter/adapter_model.safetensors")
    for name, tensor in fresh_adapter.items():
        assert (tensor - adapter[name]).abs().max() < 1e-4, name
    # The resumed run's curves cover the whole run, as the uninterrupted one's do.
    assert curve == (project / "metrics/curves/plots/metrics/train/loss.tsv").read_text()

