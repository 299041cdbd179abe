"""Each stage run under DVC records what it cost; the PR report shows both revisions' costs."""

import json
import subprocess
import sys

from sabia_ift import cost
from sabia_ift.report import cost_section

STAGE = """
import sys, time
from sabia_ift import stage

def main(args):
    end = time.process_time() + 0.3
    while time.process_time() < end:  # CPU time the record must count
        pass

sys.exit(stage.run(main, None))
"""


def run_stage(tmp_path, env_extra):
    script = tmp_path / "busy.py"
    script.write_text(STAGE)
    env = {"PATH": "/usr/bin:/bin", **env_extra}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_stage_under_dvc_records_wall_and_cpu_time_and_no_gpu(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    done = run_stage(tmp_path, {"DVC_STAGE": "busy", "DVC_ROOT": str(root), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    record = json.loads((root / "logs" / "cost" / "busy.json").read_text())
    assert record["stage"] == "busy"
    assert 0.3 <= record["cpu_s"] < 60
    assert record["wall_s"] >= record["cpu_s"] * 0.5  # one process: wall time is not far below CPU time
    assert record["gpus"] == 0 and record["gpu_s"] is None and record["energy_j"] is None


def test_a_stage_run_by_hand_leaves_no_cost_file(tmp_path):
    done = run_stage(tmp_path, {"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "logs").exists()


def test_energy_is_the_counter_delta_of_the_gpus_used_and_null_without_a_counter():
    readings = iter([[1_000_000, 5_000], [1_250_000, 9_000]])  # millijoules, two cards
    meter = cost.Meter(energy=lambda: next(readings))
    record = meter.record(gpus=1)
    assert record["energy_j"] == 250.0 and record["gpus"] == 1 and record["gpu_s"] > 0

    no_counter = cost.Meter(energy=lambda: None).record(gpus=1)
    assert no_counter["energy_j"] is None and no_counter["gpu_s"] > 0


def test_the_report_shows_both_revisions_costs_side_by_side(tmp_path):
    base, head = tmp_path / "base", tmp_path / "head"
    for folder, wall, energy in ((base, 120.0, None), (head, 60.0, 7200.0)):
        folder.mkdir()
        (folder / "train.json").write_text(json.dumps(
            {"stage": "train", "wall_s": wall, "cpu_s": wall * 2, "gpus": 1, "gpu_s": wall, "energy_j": energy}))
    (head / "evaluate.json").write_text(json.dumps(
        {"stage": "evaluate", "wall_s": 30.0, "cpu_s": 30.0, "gpus": 0, "gpu_s": None, "energy_j": None}))
    text = "\n".join(cost_section(str(base), str(head), "main", "head"))
    assert "### Cost of each run" in text
    train = next(line for line in text.splitlines() if line.startswith("| train"))
    assert "120.0 s → 60.0 s" in train and "240.0 s → 120.0 s" in train and "→ 2.0 Wh" in train
    evaluate = next(line for line in text.splitlines() if line.startswith("| evaluate"))
    assert evaluate.count("30.0 s") == 2  # ran only on head: the base side says so
    assert "all stages run" in text


def test_no_cost_logs_no_section(tmp_path):
    assert cost_section(str(tmp_path / "missing"), None, "main", "head") == []
