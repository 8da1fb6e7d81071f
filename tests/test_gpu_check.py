"""`bench/gpu_check.py --smoke`: every stage of `make gpu-check` runs on CPU at tiny shapes, with the
imports a GPU box lacks blocked (requests, tenacity, atroposlib, vllm, flash_attn, liger_kernel): so the
script is known to run, and to need only torch/transformers/numpy and this checkout, before a GPU
ever sees it. The GPU run itself is `make gpu-check` (README, "GPU check")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.blocked import blocked_runner

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_stage_without_the_serving_stack(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    code = blocked_runner("bench/gpu_check.py", ["--smoke", "--results-dir", str(tmp_path)])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    runs = list((tmp_path / "gpu_check").glob("*-smoke.json"))
    assert len(runs) == 1, out[-2000:]
    res = json.loads(runs[0].read_text())
    assert res["ok"] and [s["stage"] for s in res["stages"]] == [0, 1, 2, 3, 4]
    for s in res["stages"]:
        assert s["status"] == "pass" and s["checks"], (s["stage"], s["error"], s["checks"][-3:])
    assert any("liger" in n for n in res["stages"][3]["notes"])  # the peer row is skipped with a note
    csv_lines = (tmp_path / "gpu_check.csv").read_text().splitlines()
    assert csv_lines[0].startswith("device,commit,date,stage") and len(csv_lines) > 20
    assert (tmp_path / "loss.csv").exists()
    # A failing check makes the run fail: the script's exit code is the gate.
    bad = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--stages", "0", "--device", "cuda:0",
                          "--results-dir", str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "no CUDA device" in bad.stderr
