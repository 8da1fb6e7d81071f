"""`drivers/train.py --atropos-url synthetic`: the driver itself, on seeded synthetic groups, on a
machine without the serving stack (requests, tenacity, atroposlib, vllm unimportable), as a GPU
node without Atropos runs it (`make gpu-check` stage 4 does the same on CUDA)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from atropos_core.data import DataConfig, build_train_batch, validate_group
from atropos_core.checkpoint import find_latest
from atropos_core.client import AtroposConfig
from atropos_core.config import ConfigError, parse_args
from atropos_core.synthetic import SyntheticBatches
from tests.fixtures.blocked import blocked_runner

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_groups_have_the_api_shape_and_pass_validation():
    cfg = AtroposConfig(url="synthetic", batch_size=12, group_size=4, max_token_len=20)
    src = SyntheticBatches(cfg, vocab_size=50, seed=3)
    groups = src.wait_for_batch()
    assert len(groups) == 3 and all(len(g) == 14 for g in groups)  # atroposlib's 14 keys
    data = DataConfig(max_token_len=20, vocab_size=50)
    for g in groups:
        assert validate_group(g, data) == (True, "")
        n_prompt = g["masks"][0].count(-100)
        assert n_prompt >= 1 and all(len(t) <= 20 and max(t) < 50 for t in g["tokens"])
        assert all(m[:n_prompt] == [-100] * n_prompt and m[n_prompt:] == t[n_prompt:]
                   for m, t in zip(g["masks"], g["tokens"]))
    batch = build_train_batch(groups, data)
    assert batch.num_sequences == 12 and batch.total_trained_tokens > 0
    # Seeded per step: a resumed source (starting_step 1) draws the original's second batch.
    again = SyntheticBatches(AtroposConfig(url="synthetic", batch_size=12, group_size=4, max_token_len=20,
                                           starting_step=1), vocab_size=50, seed=3)
    assert again.wait_for_batch() == src.wait_for_batch() != groups
    assert src.metrics()["data/batches"] == 2


def test_synthetic_url_implies_no_api_no_env_no_inference():
    cfg = parse_args(["--model", "x", "--atropos-url", "synthetic"])
    assert (cfg.atropos.url, cfg.run.start_api, cfg.env.start, cfg.inference.start) == ("synthetic", False, False,
                                                                                        False)
    try:
        parse_args(["--model", "x", "--atropos-url", "synthetc"])
        raise AssertionError("a misspelt URL must be a config error")
    except ConfigError as e:
        assert "http(s) URL" in str(e)


def test_driver_trains_on_synthetic_batches_without_the_serving_stack(tmp_path):
    from atropos_core.envs.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden_size=32, intermediate_size=64, vocab_size=128)
    out = tmp_path / "run"
    argv = ["--model", str(model), "--atropos-url", "synthetic", "--steps", "3", "--out", str(out),
            "--max-token-len", "24", "--atropos.batch_size", "8", "--atropos.group_size", "4",
            "--checkpoint.every", "0", "--run.device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", blocked_runner("drivers/train.py", argv,
                                                                ("requests", "tenacity", "atroposlib", "vllm"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("SYNTHETIC batches") == 1, log[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/total"]) and r["data/synthetic"] == 1 for r in rows)
    # The run's end saved a complete checkpoint of step 3 (checkpoint.every 0: only that one).
    assert find_latest(out / "checkpoints").name == "step-00000003"
