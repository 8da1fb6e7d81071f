"""The RL loop: fetch an Atropos batch → forward/backward with the fused loss → optimizer step →
push the weights into vLLM → log. Everything else is a function in `atropos_core` called from here.

    python drivers/train.py                 # the whole loop on this machine, built-in defaults:
                                            # API + vLLM + built-in environment + trainer
    python drivers/train.py --model DIR --atropos-url http://HOST:PORT --inference-port 9001
    python drivers/train.py --model DIR --atropos-url synthetic --steps 5   # no API/vLLM/env: random groups
    torchrun --nproc-per-node 2 drivers/train.py ...      # FSDP2 over 2 ranks
    python drivers/train.py --help          # every config field, all overridable

Exit codes: 0 done, 1 a part failed (the reason is printed; a checkpoint is saved when the
trainer itself was healthy), 2 a config mistake, 130 interrupted (Ctrl-C / SIGTERM; checkpoint saved).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from atropos_core import control, cpu_budget, dist as adist  # noqa: E402
from atropos_core.data import broadcast_groups, build_train_batch, split_for_ranks  # noqa: E402
from atropos_core.checkpoint import load_checkpoint, resolve_resume, save_checkpoint  # noqa: E402
from atropos_core.client import SYNTHETIC_URL, AtroposClient, env_metrics  # noqa: E402
from atropos_core.config import ConfigError, parse_args, to_dict, write_config  # noqa: E402
from atropos_core.metrics import MetricsLogger  # noqa: E402
from atropos_core.services import ServiceError, launch_services, share_launch_info  # noqa: E402
from atropos_core.model import apply_fsdp, build_optimizer, load_model_and_tokenizer  # noqa: E402
from atropos_core.steptime import RunTime, StepClock  # noqa: E402
from atropos_core.served_check import served_tolerance, start_served_check  # noqa: E402
from atropos_core.trainer import train_step  # noqa: E402
from atropos_core.weight_sync import WeightSync  # noqa: E402

logger = logging.getLogger("train")


def batch_metrics(batch) -> dict:
    """Reward and advantage statistics of the batch, plus the data/* counters. The reward counts
    every valid sequence, duplicates of kept groups included (see `data.validate.filter_groups`)."""
    scores = torch.tensor(batch.scores, dtype=torch.float64)
    n = len(scores) + batch.metrics.get("data/duplicate_sequences", 0)
    total = float(scores.sum()) + batch.metrics.get("data/duplicate_score_sum", 0.0)
    adv = sum(float((mb.advantages * mb.loss_mask).sum()) for mb in batch.micro_batches)
    return {"reward/mean": total / n if n else float("nan"),
            "reward/max": float(scores.max()) if len(scores) else float("nan"),
            "advantage/mean": adv / max(batch.total_trained_tokens, 1),
            "data/groups": batch.num_groups, "data/sequences": batch.num_sequences, **batch.metrics}


def open_batch_source(cfg, step: int):
    """Rank 0's source of groups: the Atropos API, or seeded synthetic groups (`--atropos-url synthetic`)."""
    acfg = dataclasses.replace(cfg.atropos, starting_step=step)
    if acfg.url == SYNTHETIC_URL:
        from atropos_core.synthetic import SyntheticBatches

        return SyntheticBatches(acfg, cfg.data.vocab_size, seed=cfg.run.seed)
    return AtroposClient(acfg)


@contextmanager
def others_stop_on_error(world: int):
    """On rank 0: an exception inside sends the other ranks "stop" with its reason (they wait for a
    control message), then propagates."""
    try:
        yield
    except Exception as e:
        if world > 1:
            control.send_stop(f"{type(e).__name__}: {e}")
        raise


def fetch_groups_or_stop(client: AtroposClient, services, world: int, device) -> list:
    """Rank 0's fetch, checking the child processes at every poll (a dead vLLM server starves the
    environments: the wait ends naming it instead of after atropos.max_wait_s). The other ranks get
    a control message first: "batch" (the batch follows) or, when the fetch fails, "stop" with the
    reason, so every rank leaves the loop together and saves the (collective) checkpoint."""
    with others_stop_on_error(world):
        groups = client.wait_for_batch(abort_check=services.check if services else None)
    if world > 1:
        control.send_batch_follows()
        broadcast_groups(groups, device=device, raw=client.last_raw)
    return groups


def wait_for_envs_or_stop(client: AtroposClient, services, world: int) -> None:
    """Rank 0 waits until every environment the run started has registered with the API (a batch
    taken earlier is built from the faster ones alone: `AtroposClient.wait_for_envs`); when that
    fails, the other ranks are told to stop, as in `fetch_groups_or_stop`."""
    with others_stop_on_error(world):
        client.wait_for_envs([p.name for p in services.envs], abort_check=services.check)


def receive_groups_or_stop(device) -> list:
    control.expect_batch()  # raises control.StopRequested when rank 0 stops the run
    return broadcast_groups(device=device)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    rank, world, local_rank, device = adist.init_distributed(None if cfg.run.device == "auto" else cfg.run.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    budget = cpu_budget.plan_for_run(cfg, device)
    logger.info("%s", budget.describe())
    cpu_budget.apply_to_trainer(budget, local_rank)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the run like Ctrl-C
    torch.manual_seed(cfg.run.seed + rank)
    services, sync, model, step, saved_step, safe_to_save, rc = None, None, None, 0, 0, False, 1
    check_pool = ThreadPoolExecutor(1, thread_name_prefix="served-check")  # its thread starts on first use
    run_time = RunTime()  # every step's perf/*_s added up, for the line at the end
    try:
        if rank == 0:
            cfg, services = launch_services(cfg, device, budget)  # model dir, API, vLLM, env
        cfg, token, server_urls = share_launch_info(cfg, services, world)
        if rank == 0:
            write_config(cfg, Path(cfg.run.out) / "config.json")
        model, tokenizer = load_model_and_tokenizer(cfg.model, device)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, vocab_size=model.get_input_embeddings().weight.shape[0],
            pad_token_id=tokenizer.pad_token_id or 0))
        if adist.is_dist():  # torchrun, even with one rank: FSDP2 brings bf16 mixed precision on GPU
            apply_fsdp(model, device, mixed_precision=cfg.model.mixed_precision)
        optimizer, scheduler = build_optimizer(model, cfg.optim)
        resume_from = resolve_resume(cfg.checkpoint)
        if resume_from is not None:
            step = load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
            logger.info("resumed from %s at step %d", resume_from, step)
        client = open_batch_source(cfg, step) if rank == 0 else None
        if client:
            client.register()
            if services is not None and services.envs and isinstance(client, AtroposClient):
                wait_for_envs_or_stop(client, services, world)
        sync = WeightSync(cfg.sync, server_urls, token, rank, world) if server_urls else None
        if sync:
            sync.connect(device)
            if step > 0:  # the servers loaded the base model; bring them to the resumed weights
                sync.push(model, step)
        log = MetricsLogger(cfg.logging, run_config=to_dict(cfg))
        safe_to_save, nonfinite_streak = True, 0
        clock = StepClock()  # perf/*_s: where each step's wall time went; they add up to perf/step_s
        checking = None  # the served-policy check of the last push; its server side runs on check_pool
        while step < cfg.run.steps:
            clock.lap("other")
            groups = fetch_groups_or_stop(client, services, world, device) if client else receive_groups_or_stop(device)
            clock.lap("wait_data")
            batch = build_train_batch(groups, cfg.data, log_drops=rank == 0)
            if batch.total_trained_tokens == 0:
                logger.warning("every group of this batch was dropped (%s); waiting for the next", batch.metrics)
                continue
            mine = split_for_ranks(batch.micro_batches, world, pad_token_id=cfg.data.pad_token_id)[rank]
            # How many steps behind the weights it trains from the batch was sampled (asked meanwhile).
            stale = sync.staleness_async(groups, step) if sync and client else None
            clock.lap("other")
            safe_to_save = False  # an exception inside the step may leave weights half-updated
            m = train_step(model, optimizer, scheduler, mine, cfg.loss,
                           global_normalizer=cfg.loss.normalizer(batch.total_trained_tokens, batch.num_sequences), grad_clip=cfg.optim.grad_clip)
            safe_to_save = True
            clock.lap("train")
            step += 1
            nonfinite_streak = nonfinite_streak + 1 if m["train/skipped_nonfinite"] else 0
            if nonfinite_streak >= cfg.run.max_nonfinite_steps:
                raise RuntimeError(f"{nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                                   f"(run.max_nonfinite_steps={cfg.run.max_nonfinite_steps}); stopping")
            if sync:
                if checking is not None:  # the last push's check, done before this push changes the servers
                    m.update(checking.result())
                    checking = None
                m.update(sync.push(model, step))  # incl. sync/server_version, what the servers now serve
                if cfg.sync.verify_every and step % cfg.sync.verify_every == 0:  # the served policy, checked
                    checking = start_served_check(model, server_urls, cfg.data.vocab_size, step=step,
                                                  tolerance=served_tolerance(model, cfg.sync.wire_dtype),
                                                  executor=check_pool)
                clock.lap("sync")
            m.update(batch_metrics(batch), **env_metrics(groups), **(client.metrics() if client else {}))
            if stale is not None:
                m.update(stale.result())
            m.update(clock.split())
            run_time.add(m)
            m["perf/tokens_per_s"] = m["train/tokens_total"] / m["perf/step_s"]
            saving = cfg.checkpoint.should_save(step)
            log.log(step, m, redraw=not saving)  # the record first: it exists even if the save is killed
            if saving:
                save_checkpoint(cfg.checkpoint.dir, step, model, optimizer, scheduler, tokenizer,
                                keep_last=cfg.checkpoint.keep_last)
                saved_step = step
                # curves.png only after the save: beside the redraw's thread (both Python-heavy)
                # a save took 0.3-1.0 s instead of ~0.05 s.
                log.redraw_if_due(step)
            clock.lap("log")
        if checking is not None:
            checking.result()
        log.plot()
        rc = 0
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d", step)
        rc = 130
    except ConfigError as e:  # found while launching (model dir, a taken port): still a config mistake
        print(f"train.py: config error: {e}", file=sys.stderr)
        rc = 2
    except Exception as e:  # noqa: BLE001 - every failure ends here with its reason, then clean-up
        # A dead child is the reason, whichever call noticed first (a sync, a request, the fetch).
        dead = services.dead_child() if services and not isinstance(e, ServiceError) else None
        if dead is not None:
            logger.warning("%s: %s (seen after a child process died)", type(e).__name__, e)
            e = dead
        logger.error("run failed at step %d: %s: %s", step, type(e).__name__, e, exc_info=rank == 0 and
                     not isinstance(e, (RuntimeError, ConnectionError, TimeoutError)))
        rc = 1
    finally:
        try:
            if model is not None and safe_to_save and step > saved_step and cfg.checkpoint.dir:
                save_checkpoint(cfg.checkpoint.dir, step, model, optimizer, scheduler, tokenizer,
                                keep_last=cfg.checkpoint.keep_last)
        except Exception as e:  # noqa: BLE001
            logger.error("could not save the final checkpoint: %s", e)
        check_pool.shutdown(wait=False, cancel_futures=True)
        if sync:
            sync.close()
        if services:
            services.stop_all()
        adist.cleanup()
    if rank == 0:
        summary = run_time.summary(cfg.env.max_batches_offpolicy())
        if summary:
            logger.info("%s", summary)
        print(f"train.py: {'done' if rc == 0 else 'stopped'} at step {step} (exit {rc}); run dir {cfg.run.out}",
              file=sys.stderr if rc else sys.stdout)
    return rc


if __name__ == "__main__":
    sys.exit(main())
