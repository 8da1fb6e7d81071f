"""Where the time of an RL step goes, end to end: waiting for data, training, syncing weights.

Reads a run's `metrics.jsonl` (or runs `drivers/train.py` first, the default built-in run unless
other driver arguments are given after `--`) and reports per-step medians of

    wait_data_s   trainer blocked on the Atropos API (/batch): rollout generation + scoring
    train_s       forward + backward + optimizer step (train_step)
    sync_ms       pushing the new weights into every vLLM server
    step_s        the whole step; tokens_per_s = trained + context tokens / step_s

Rows are appended to bench/results/e2e.csv (long format, with device, commit and date).

    python bench/bench_e2e.py --run-dir runs/default
    python bench/bench_e2e.py --steps 20              # runs a short default run first
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_rows, run_meta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["device", "commit", "date", "run", "steps", "wait_data_s", "train_s", "sync_ms", "step_s", "tokens_per_s",
          "reward_first10", "reward_last10"]


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no steps")
    rows = rows[1:] if len(rows) > 3 else rows  # step 1 includes the environment's first rollouts
    med = lambda k: statistics.median(r[k] for r in rows if k in r)  # noqa: E731
    rewards = [r["reward/mean"] for r in rows]
    return {"run": str(run_dir), "steps": len(rows) + 1, "wait_data_s": med("perf/wait_data_s"),
            "train_s": med("perf/train_step_s"), "sync_ms": med("sync/ms"), "step_s": med("perf/step_s"),
            "tokens_per_s": med("perf/tokens_per_s"), "reward_first10": statistics.mean(rewards[:10]),
            "reward_last10": statistics.mean(rewards[-10:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="summarize this finished run instead of starting one")
    p.add_argument("--steps", type=int, default=20, help="steps of the run started when no --run-dir")
    p.add_argument("driver_args", nargs="*", help="extra drivers/train.py arguments (after --)")
    args = p.parse_args(argv)
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench_e2e_")) / "run"
        cmd = [sys.executable, str(ROOT / "drivers" / "train.py"), "--steps", str(args.steps), "--out", str(run_dir),
               *args.driver_args]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    row = {**run_meta(), **summarize(run_dir)}
    append_rows(ROOT / "bench" / "results" / "e2e.csv", FIELDS, [row])
    for k in FIELDS[3:]:
        v = row[k]
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
