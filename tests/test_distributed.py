"""Two processes (DDP over gloo, on CPU) train what one process with the same global batch trains."""

import csv
import json
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, deep_merge, default_params, project_env, tokenized_split
from sabia_ift.train.distributed import accumulation_per_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenized(tokenizer, tmp_path_factory):
    return tokenized_split(tmp_path_factory.mktemp("ddp-data"), tokenizer, 120, 96, 16)


def stage_command(folder, tiny_base, tokenized, train) -> list[str]:
    """Writes the params into `folder`; the train stage's arguments for that folder."""
    folder.mkdir(exist_ok=True)
    params = deep_merge(default_params(), {"train": {
        "epochs": 1, "lr": 3e-3, "logging_steps": 1, "eval_steps": 100, "save_steps": 100, "device": "cpu",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, **train}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return ["--params", str(folder / "params.yaml"), "--base", str(tiny_base),
            "--data", str(tokenized), "--out", str(folder / "adapter"), "--checkpoints", str(folder / "ckpt"),
            "--live", str(folder / "live"), "--metrics", str(folder / "train.json"),
            "--timings", str(folder / "timings.json"), "--logs", str(folder / "logs")]


def stage_env(folder) -> dict[str, str]:
    return {**project_env(folder), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def outputs(folder):
    curve = list(csv.DictReader((folder / "live/plots/metrics/train/loss.tsv").open(), delimiter="\t"))
    return (json.loads((folder / "train.json").read_text()), json.loads((folder / "timings.json").read_text()),
            load_file(folder / "adapter/adapter_model.safetensors"), [float(r["loss"]) for r in curve])


def run_stage(tmp_path, tiny_base, tokenized, name, train):
    folder = tmp_path / name
    cmd = [sys.executable, "-m", "stages.train", *stage_command(folder, tiny_base, tokenized, train)]
    result = subprocess.run(cmd, cwd=REPO, env=stage_env(folder), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return outputs(folder)


def assert_same_training(one, two, processes=2):
    (m1, t1, a1, c1), (m2, t2, a2, c2) = one, two
    assert t2["processes"] == processes and t1["processes"] == 1
    assert m1["steps"] == m2["steps"] and t1["rows_seen"] == t2["rows_seen"] == 96  # nothing dropped or repeated
    assert t1["global_batch"] == {**t2["global_batch"], "micro_batches_per_process": 2, "processes": 1}
    assert c1 == pytest.approx(c2, rel=1e-4, abs=1e-4)
    # The final evaluation's loss, a mean over every validation token, summed across the processes.
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=1e-4)
    for name, tensor in a1.items():
        assert (tensor - a2[name]).abs().max() < 1e-4, name


PADDED = {"packing": False, "micro_batch_size": 4, "micro_batch_tokens": 600, "loss_weighting": "tokens"}


@pytest.fixture(scope="module")
def one_padded(tiny_base, tokenized, tmp_path_factory):
    """One process, padded batches, two micro-batches a step: the reference both DDP launches are held to."""
    return run_stage(tmp_path_factory.mktemp("ddp-one"), tiny_base, tokenized, "one",
                     {**PADDED, "devices": 1, "grad_accum": 2})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_started_by_the_user_match_one_process(tmp_path, tiny_base, tokenized, one_padded):
    # As README's "Several machines" says: one torchrun agent per node, the stage's own
    # arguments after `--`, train.devices the processes of one node (so the stage does not relaunch).
    folder = tmp_path / "nodes"
    args = stage_command(folder, tiny_base, tokenized, {**PADDED, "devices": 1, "grad_accum": 2})
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**stage_env(folder), "GLOO_SOCKET_IFNAME": "lo"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "sabia",
         "--local-addr", "127.0.0.1", "-m", "stages.train", "--", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [agent.communicate(timeout=900)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert_same_training(one_padded, outputs(folder))


@pytest.mark.parametrize(("packing", "weighting"), [(False, "tokens"), (True, "tokens"), (True, "rows")],
                         ids=["padded", "packed", "packed-rows"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_base, tokenized, one_padded,
                                                            packing, weighting):
    # rows: each process weighs its rows by the step's rows and tokens over both processes.
    layout = {"packing": packing, "micro_batch_size": 4, "micro_batch_tokens": 600, "loss_weighting": weighting}
    one = one_padded if layout == PADDED else run_stage(tmp_path, tiny_base, tokenized, "one",
                                                          {**layout, "devices": 1, "grad_accum": 2})
    two = run_stage(tmp_path, tiny_base, tokenized, "two", {**layout, "devices": 2, "grad_accum": 2})
    assert_same_training(one, two)


def test_a_global_batch_that_cannot_be_split_is_refused():
    from sabia_ift.errors import ConfigError

    assert accumulation_per_process(4, 2) == 2
    with pytest.raises(ConfigError, match="train.grad_accum: 3 .* over 2 processes"):
        accumulation_per_process(3, 2)


def test_the_stage_relaunches_only_when_no_launcher_started_it(monkeypatch):
    from sabia_ift.train.distributed import LAUNCHED, needs_launch

    for name in (LAUNCHED, "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert needs_launch(2) and not needs_launch(1)
    # A torchrun agent the user started (one per node, README "Several machines") sets LOCAL_RANK.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_launch(2)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv(LAUNCHED, "[]")  # the stage's own torchrun, before its workers start
    assert not needs_launch(2)
