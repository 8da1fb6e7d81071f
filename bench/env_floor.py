"""How fast a run's environments can feed a trainer that costs nothing: the floor of its step.

Starts what `drivers/train.py` would start for the same arguments (the API, the vLLM servers, the
environments, under the same CPU budget), then takes batches from the API as a trainer does but
trains nothing and pushes no weights. The interval between two batches is the shortest step any
trainer could have on that data path; a real trainer's step near it means the trainer waits on the
environments, and only they (their loop, the inference servers) can make the step shorter.

    python bench/env_floor.py --steps 150 -- --model runs/model --env.module my_env ...

Prints one JSON line last: {"step_s": [...], "wait_s": [...]} (seconds, per batch after the first).
`bench/bench_e2e.py --task echo` runs it as the "environment alone" row.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="batches to take")
    p.add_argument("driver_args", nargs="*", help="drivers/train.py arguments (after --)")
    args = p.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (an interval needs two batches)")

    from atropos_core import cpu_budget, dist as adist
    from atropos_core.client import AtroposClient
    from atropos_core.config import ConfigError, parse_args
    from atropos_core.services import launch_services

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    driver = list(args.driver_args)
    if not any(a.split("=", 1)[0] in ("--out", "--run.out") for a in driver):
        driver += ["--out", tempfile.mkdtemp(prefix="env_floor_")]
    try:
        cfg = parse_args(["--steps", str(args.steps), *driver])
    except ConfigError as e:
        raise SystemExit(f"env_floor.py: config error: {e}") from None
    if not (cfg.run.start_api and cfg.env.start):
        raise SystemExit("env_floor.py measures the environments this run starts: leave run.start_api and "
                         "env.start on")
    # the device the driver would pick (CUDA when there is one): the servers start as in the run
    _, _, _, device = adist.init_distributed(None if cfg.run.device == "auto" else cfg.run.device,
                                             single_rank_group=False)
    budget = cpu_budget.plan_for_run(cfg, device)
    cpu_budget.apply_to_trainer(budget, 0)
    cfg, services = launch_services(cfg, device, budget)
    try:
        client = AtroposClient(cfg.atropos)
        client.register()
        client.wait_for_envs([e.name for e in services.envs], abort_check=services.check)
        took, waits = [], []
        for _ in range(args.steps):
            t0 = time.monotonic()
            client.wait_for_batch(abort_check=services.check)
            took.append(time.monotonic())
            waits.append(took[-1] - t0)
            if len(took) % 50 == 0 or len(took) == args.steps:
                print(f"env_floor: {len(took)}/{args.steps} batches", file=sys.stderr, flush=True)
    finally:
        services.stop_all()
    print(json.dumps({"step_s": [b - a for a, b in zip(took, took[1:])], "wait_s": waits[1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
