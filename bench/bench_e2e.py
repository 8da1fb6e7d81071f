"""Where the time of an RL step goes, end to end, and how fast the loop learns.

Two modes. Rows are appended to bench/results/e2e.csv (long format, with device, commit, date).

**A run** (default): reads a run's `metrics.jsonl` (or runs `drivers/train.py` first, the built-in
default run unless other driver arguments follow `--`) and reports per-step medians of the
`perf/*_s` split, which adds up to the step (`atropos_core.steptime`):

    wait_data_s   trainer blocked on the Atropos API (/batch): rollout generation + scoring
    train_s       forward + backward + optimizer step (train_step)
    sync_s        pushing the new weights into every vLLM server (sync_ms: WeightSync's own timer)
    log_s         metrics line, JSONL, plot, checkpoint
    step_s        the whole step; loop_s = sum of step_s over the run (start-up excluded)
    staleness     trainer step minus the weight version each sequence was sampled with
    entropy       the policy's mean entropy over the last 10 steps; 0-grad: the share of steps with a
                  zero gradient (every group scored alike): together, why a run stopped learning

**The echo task** (`--task echo`), held out from the defaults: a random-initialised 2-layer,
128-wide Qwen2 with a 300-token vocabulary learns to echo prompt tokens (`bench/echo_env.py`);
4 prompts x 4 samples of 6 tokens per step, lr 3e-3, seeds 0 and 1. One row for ours (API + env +
vLLM + sync, separate processes) and one for TRL's GRPO trainer in one process with HF generate
(`bench/trl_echo.py`, when `trl` is installed), and one for the environment alone: our processes
with a trainer that takes the batches and trains nothing (`bench/env_floor.py`), the shortest step
the environment's data path allows any trainer. Ours and it run twice per seed (`--offpolicy 1,2`): with the
environment allowed one batch in the API queue (`max_batches_offpolicy` 1, on policy: it samples
batch N+1 once the trainer took batch N, mostly after that step's push) and two (one batch ahead:
sampling overlaps training, the data one step stale, corrected by the loss's `is_mode`). Targets:
median s/step <= 0.07; steps to a 10-step mean reward >= 0.6 no more than TRL's.

    python bench/bench_e2e.py --run-dir runs/default
    python bench/bench_e2e.py --steps 120                       # the no-argument demo, 120 steps
    python bench/bench_e2e.py --task echo [--steps 300] [--seeds 0,1] [--offpolicy 1,2]

**Off-policy correction on and off** (`--offpolicy N --is-modes token_tis,none --seeds 0,1`): the
default run with the built-in environment allowed N batches ahead of the trainer
(`--env.max_batches_offpolicy N`), once per `loss.is_mode` and seed; the rows add the run's mean
staleness, `offpolicy/mismatch_kl` and `offpolicy/is_weight_mean` (docs/offpolicy.md).

    python bench/bench_e2e.py --steps 120 --offpolicy 4 --is-modes token_tis,none --seeds 0,1
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
          "reward_first10", "reward_last10", "task", "system", "seed", "loop_s", "sync_s", "log_s", "other_s",
          "steps_to_0.6", "staleness_mean", "staleness_max", "is_mode", "mismatch_kl", "is_weight_mean",
          "is_weight_max", "truncated_frac", "entropy_last10", "zero_grad_frac"]
ECHO = {"vocab_size": 300, "hidden_size": 128, "num_layers": 2, "prompts": 4, "group": 4, "new_tokens": 6,
        "lr": 3e-3}
TARGET_REWARD, WINDOW = 0.6, 10


def steps_to(rewards: list[float], target: float = TARGET_REWARD, window: int = WINDOW):
    """First step (1-based) whose trailing `window`-step mean reward is >= `target`, else None."""
    for i in range(window, len(rewards) + 1):
        if statistics.mean(rewards[i - window:i]) >= target:
            return i
    return None


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no steps")
    rewards = [r["reward/mean"] for r in rows]
    loop_s = sum(r["perf/step_s"] for r in rows)
    timed = rows[1:] if len(rows) > 3 else rows  # step 1 includes the environment's first rollouts
    med = lambda k: statistics.median(r[k] for r in timed if k in r) if any(k in r for r in timed) else None  # noqa: E731
    stale = [r["data/staleness_mean"] for r in rows if "data/staleness_mean" in r]
    mean_of = lambda k: statistics.mean(r[k] for r in rows if k in r) if any(k in r for r in rows) else None  # noqa: E731
    cfg_path = run_dir / "config.json"
    is_mode = json.loads(cfg_path.read_text()).get("loss", {}).get("is_mode") if cfg_path.exists() else None
    return {"run": str(run_dir), "steps": len(rows), "wait_data_s": med("perf/wait_data_s"),
            "train_s": med("perf/train_step_s"), "sync_ms": med("sync/ms"), "step_s": med("perf/step_s"),
            "sync_s": med("perf/sync_s"), "log_s": med("perf/log_s"), "other_s": med("perf/other_s"),
            "tokens_per_s": med("perf/tokens_per_s"), "loop_s": loop_s,
            "reward_first10": statistics.mean(rewards[:10]), "reward_last10": statistics.mean(rewards[-10:]),
            "steps_to_0.6": steps_to(rewards),
            "staleness_mean": statistics.mean(stale) if stale else None,
            "staleness_max": max((r["data/staleness_max"] for r in rows if "data/staleness_max" in r), default=None),
            "is_mode": is_mode, "mismatch_kl": mean_of("offpolicy/mismatch_kl"),
            "is_weight_mean": mean_of("offpolicy/is_weight_mean"),
            "is_weight_max": max((r["offpolicy/is_weight_max"] for r in rows if "offpolicy/is_weight_max" in r),
                                 default=None),
            "truncated_frac": mean_of("offpolicy/truncated_frac"),
            # Why a run stops learning: the policy's entropy at the end, and the share of steps whose
            # gradient was 0 (every group's samples scored alike, so every GRPO advantage was 0).
            "entropy_last10": statistics.mean(r["entropy/mean"] for r in rows[-10:])
            if all("entropy/mean" in r for r in rows[-10:]) else None,
            "zero_grad_frac": statistics.mean(float(r["grad/norm"] == 0) for r in rows)
            if all("grad/norm" in r for r in rows) else None}


def run_driver(run_dir: Path, steps: int, args: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "drivers" / "train.py"), "--steps", str(steps), "--out", str(run_dir), *args]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def echo_model(work: Path, seed: int) -> Path:
    from atropos_core.envs.tiny_model import build_tiny_model

    return build_tiny_model(work / f"echo_model_s{seed}", vocab_size=ECHO["vocab_size"],
                            hidden_size=ECHO["hidden_size"], num_layers=ECHO["num_layers"], seed=seed)


def echo_driver_args(model: Path, seed: int, offpolicy: int) -> list[str]:
    """drivers/train.py arguments of the echo task (model, seed, lr, environment, batch)."""
    return ["--model", str(model), "--seed", str(seed), "--optim.lr", str(ECHO["lr"]),
            "--env.module", "bench.echo_env", "--env.group_size", str(ECHO["group"]),
            "--atropos.batch_size", str(ECHO["prompts"] * ECHO["group"]),
            "--env.extra_args", f"--env.max_new_tokens {ECHO['new_tokens']} --env.seed {seed} "
                                f"--env.max_batches_offpolicy {offpolicy}"]


def ours_echo(work: Path, seed: int, steps: int, offpolicy: int = 1, extra: tuple = ()) -> dict:
    model = echo_model(work, seed)
    run_dir = work / f"ours_ahead{offpolicy}_s{seed}"  # its own directory: a used one would resume
    run_driver(run_dir, steps, [*echo_driver_args(model, seed, offpolicy), *extra])
    return summarize(run_dir)


def env_echo(work: Path, seed: int, steps: int, offpolicy: int = 1, extra: tuple = ()) -> dict:
    """The echo task's processes with a trainer that trains nothing (`bench/env_floor.py`): the
    shortest step the environment's data path allows, whatever the trainer."""
    model = echo_model(work, seed)
    cmd = [sys.executable, str(ROOT / "bench" / "env_floor.py"), "--steps", str(steps), "--",
           *echo_driver_args(model, seed, offpolicy), "--out", str(work / f"env_ahead{offpolicy}_s{seed}"), *extra]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run": f"env alone seed {seed}", "steps": len(res["step_s"]) + 1,
            "step_s": statistics.median(res["step_s"]), "wait_data_s": statistics.median(res["wait_s"]),
            "loop_s": sum(res["step_s"])}


def trl_echo(work: Path, seed: int, steps: int) -> dict | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed: the TRL row is not measured (pip install trl)", flush=True)
        return None
    model = echo_model(work, seed)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_echo.py"), str(model), "--seed", str(seed),
                           "--steps", str(steps)], check=True, capture_output=True, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    times = res["step_s"][1:] if len(res["step_s"]) > 3 else res["step_s"]
    return {"run": f"trl seed {seed}", "steps": len(res["rewards"]), "step_s": statistics.median(times),
            "loop_s": sum(res["step_s"]), "reward_first10": statistics.mean(res["rewards"][:10]),
            "reward_last10": statistics.mean(res["rewards"][-10:]), "steps_to_0.6": steps_to(res["rewards"]),
            # As ours: TRL's mean token entropy, and the share of steps in which every group scored
            # alike (TRL's frac_reward_zero_std is 1: every advantage, so the gradient, is 0).
            "entropy_last10": statistics.mean(res["entropy"][-10:]) if res.get("entropy") else None,
            "zero_grad_frac": statistics.mean(float(z == 1.0) for z in res["frac_reward_zero_std"])
            if res.get("frac_reward_zero_std") else None}


def _fmt(v, spec: str) -> str:
    """`v` formatted by `spec`, or "-" at the same width when there is no value."""
    width = spec.split(".")[0]  # "8.3f" -> "8"
    return format(v, spec) if v is not None else format("-", f">{width}" if width else "")


def _reached(row: dict) -> str:
    """A row's steps to the target reward as printed: "-" for a row that trains nothing (the
    environment alone), "never in N" for a run that did not get there."""
    if "steps_to_0.6" not in row:
        return "-"
    return str(row["steps_to_0.6"]) if row["steps_to_0.6"] else f"never in {row['steps']}"


def echo_task_name(offpolicy: int, extra: tuple = ()) -> str:
    """The `task` column of an echo row: how the run differed from the plain on-policy task."""
    task = "echo" if offpolicy == 1 else f"echo offpolicy={offpolicy}"
    return task + (" " + " ".join(extra) if extra else "")


def main_echo(steps: int, seeds: list[int], offpolicy: tuple = (1, 2), systems=("ours", "trl"),
              extra: tuple = ()) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench_echo_"))
    meta = run_meta()
    rows = []
    for system, measure in (("ours", ours_echo), ("env", env_echo)):
        if system in systems:
            for ahead in offpolicy:
                for seed in seeds:
                    r = measure(work, seed, steps, ahead, extra)
                    rows.append({**meta, **r, "task": echo_task_name(ahead, extra), "system": system, "seed": seed})
    if "trl" in systems:  # in process: sampling never overlaps training, so there is nothing to run ahead
        for seed in seeds:
            r = trl_echo(work, seed, steps)
            if r is not None:
                rows.append({**meta, **r, "task": "echo", "system": "trl", "seed": seed})
    append_rows(ROOT / "bench" / "results" / "e2e.csv", FIELDS, rows)
    print(f"\necho task, {steps} steps, seeds {seeds} ({meta['device']}, {meta['commit']})")
    print(f"{'':22} {'s/step':>8} {'train s':>8} {'sync ms':>8} {'wait s':>8} {'staleness':>9} {'entropy':>8} "
          f"{'0-grad':>7}  steps to 10-step mean >= 0.6")
    ahead_name = lambda a: "on policy" if a == 1 else f"{a - 1} batch ahead"  # noqa: E731
    groups = ([("ours", echo_task_name(a, extra), f"ours, {ahead_name(a)}") for a in offpolicy]
              + [("env", echo_task_name(a, extra), f"env alone, {ahead_name(a)}") for a in offpolicy]
              + [("trl", "echo", "trl")])
    for system, task, label in groups:
        mine = [r for r in rows if r["system"] == system and r["task"] == task]
        if not mine:
            print(f"{label:22} not measured (not in --systems, or trl not installed)")
            continue
        pick = lambda k: statistics.median(r[k] for r in mine) if all(r.get(k) is not None for r in mine) else None  # noqa: E731
        reach = " / ".join(_reached(r) for r in mine)
        print(f"{label:22} {_fmt(pick('step_s'), '8.3f')} {_fmt(pick('train_s'), '8.3f')} "
              f"{_fmt(pick('sync_ms'), '8.1f')} {_fmt(pick('wait_data_s'), '8.3f')} "
              f"{_fmt(pick('staleness_mean'), '9.2f')} {_fmt(pick('entropy_last10'), '8.3f')} "
              f"{_fmt(pick('zero_grad_frac'), '7.0%')}  {reach}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("run", "echo"), default="run")
    p.add_argument("--run-dir", type=Path, help="summarize this finished run instead of starting one")
    p.add_argument("--steps", type=int, default=None, help="steps (default: 20 for a run, 300 for echo)")
    p.add_argument("--seeds", default=None, help="seeds (echo: default 0,1; run: one run per seed, --seed S)")
    p.add_argument("--offpolicy", default=None,
                   help="batches the environment may hold in the API queue (its max_batches_offpolicy): run: one "
                        "value, default: the built-in env's own (1, on policy); echo: comma-separated, "
                        "default 1,2")
    p.add_argument("--is-modes", default=None,
                   help="run: one run per loss.is_mode (comma-separated, e.g. token_tis,none) and seed")
    p.add_argument("--systems", default="ours,env,trl",
                   help="echo: rows to measure (ours; env: the same processes, a trainer that trains nothing; trl)")
    p.add_argument("driver_args", nargs="*", help="extra drivers/train.py arguments (after --)")
    args = p.parse_args(argv)
    given = args.offpolicy or ("1,2" if args.task == "echo" else None)  # a run: None, the built-in env's own
    ahead = tuple(int(a) for a in given.split(",")) if given else ()
    if any(a < 1 for a in ahead):
        raise SystemExit("--offpolicy: every value must be >= 1 (1: the environment waits for the trainer)")
    if args.task == "echo":
        return main_echo(args.steps or 300, [int(s) for s in (args.seeds or "0,1").split(",")], ahead,
                         tuple(args.systems.split(",")), tuple(args.driver_args))
    if len(ahead) > 1:
        raise SystemExit("--offpolicy takes one value without --task echo")
    args.offpolicy = ahead[0] if ahead else None
    if args.run_dir is not None:
        row = {**run_meta(), **summarize(args.run_dir), "task": "default", "system": "ours"}
        append_rows(ROOT / "bench" / "results" / "e2e.csv", FIELDS, [row])
        _print_row(row)
        return 0
    extra = list(args.driver_args)
    task = "default"
    if args.offpolicy is not None:  # given: passed even when it is the built-in env's default, so the row says it
        if any(a.startswith("--env.extra_args") for a in extra):
            raise SystemExit("--offpolicy sets --env.extra_args: put the other environment arguments there instead")
        extra += ["--env.extra_args", f"--env.max_batches_offpolicy {args.offpolicy}"]
        task = f"default offpolicy={args.offpolicy}"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    modes = args.is_modes.split(",") if args.is_modes else [None]
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    rows = []
    for mode in modes:
        for seed in seeds:
            run_dir = work / f"run_{mode or 'default'}_s{seed if seed is not None else 'default'}"
            own = (["--seed", str(seed)] if seed is not None else []) + (["--loss.is_mode", mode] if mode else [])
            run_driver(run_dir, args.steps or 20, extra + own)
            row = {**run_meta(), **summarize(run_dir), "task": task, "system": "ours", "seed": seed}
            append_rows(ROOT / "bench" / "results" / "e2e.csv", FIELDS, [row])
            rows.append(row)
            _print_row(row)
    if len(rows) > 1:
        print(f"\n{task}, {args.steps or 20} steps ({rows[0]['device']}, {rows[0]['commit']})")
        print("is_mode    seed  reward first10  last10  steps to 0.6  staleness  mismatch_kl  is_weight_mean")
        for r in rows:
            print(f"{str(r['is_mode']):10} {str(r['seed']):>4}  {r['reward_first10']:14.3f}  {r['reward_last10']:6.3f}  "
                  f"{str(r['steps_to_0.6'] or 'never'):>12}  {_fmt(r['staleness_mean'], '9.2f')}  "
                  f"{_fmt(r['mismatch_kl'], '11.2e')}  {_fmt(r['is_weight_mean'], '14.4f')}")
    return 0


def _print_row(row: dict) -> None:
    for k in FIELDS[3:]:
        v = row.get(k)
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")


if __name__ == "__main__":
    sys.exit(main())
