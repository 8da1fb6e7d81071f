"""Weight-sync benchmark: our in-place sync vs a raw gloo broadcast vs the disk round trip.

For each model (the tiny test model and a ~100M-parameter Qwen2 built locally) and each CPU weight
layout of the server ("plain": loads in place; "packed": vLLM's oneDNN packing, layerwise reload) it
starts our vLLM server and measures, in the same run:
  * `generate_n1`, `generate_n16`: tokens/s of one /generate call (64 tokens each, ignore_eos), the
    other side of the layout trade-off;
  * `atropos_sync`: `WeightSync.push` end to end (the one-exchange `/weights/update`, broadcast in
    the default gloo buckets, load into vLLM, finish, prefix-cache reset, resume);
  * `raw_gloo`: a bare broadcast of the same tensors (same shapes, dtypes, order) from rank 0 to one
    receiving process with preallocated buffers, nothing loaded: the floor for the transport. Its
    rounds alternate with the syncs, each after a `SETTLE_S` pause (see there);
  * `disk_roundtrip`: `save_pretrained` (safetensors) + the server reloading that directory
    (`/weights/load_from_disk`, vLLM's `reload_weights`).
Targets (benchmark, not test): sync within 1.3x of raw broadcast, >= 5x faster than the disk trip.
Rows go to bench/results/sync.csv (long format, with device, commit and date); a table is printed.

Measured numbers and their discussion: docs/weight_sync.md (the 100M model) and
docs/loop-speed-2026-12-01.md (the tiny model's per-update target).

    python bench/bench_sync.py [--models tiny,100m] [--layouts plain,packed] [--repeats 5] [--cpu-budget off]

`sync_prepare` / `sync_send` / `sync_finish` rows are the push's phases (`sync/*_ms`); with the
manifest unchanged after the first push, prepare is the wait for `/weights/update` to answer
"ready". `--buckets 0` adds a block sent tensor by tensor.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atropos_core.cpu_budget import apply_to_trainer, available_cpus, plan_cpu_budget  # noqa: E402
from atropos_core.envs.tiny_model import build_tiny_model  # noqa: E402
from atropos_core.inference.vllm_command import new_update_token  # noqa: E402
from atropos_core.procs import free_port  # noqa: E402
from atropos_core.services import start_vllm_server  # noqa: E402
from atropos_core.weight_sync.protocol import WIRE_DTYPES  # noqa: E402
from atropos_core.weight_sync.push import WeightSync, WeightSyncConfig  # noqa: E402
from atropos_core.weight_sync.transport import broadcast, make_transfer_group  # noqa: E402
from bench.common import append_rows, run_meta  # noqa: E402

CSV_FIELDS = ["device", "commit", "date", "model", "params", "bytes", "method", "repeats", "ms_median", "ms_min",
              "MB_per_s", "x_raw_gloo", "layout", "tok_per_s", "cpu_budget"]

#: Pause before each timed sync and raw round: after any RPC, vLLM's EngineCore and worker poll their
#: shared-memory queues in a sched_yield loop for 1 s (`SpinCondition.busy_loop_s`, vLLM 0.32), which
#: would slow whatever runs next on 2 cores (a raw round right after a sync measured 392 vs 256 ms).
SETTLE_S = 1.5

MODELS = {
    "tiny": dict(),
    # 14 layers x (4*768^2 attention + 3*768*2048 MLP) ~ 99M parameters; head size 64 for vLLM's CPU backend.
    "100m": dict(hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048),
}


def _raw_receiver(port: int, world: int, shapes, dtypes, rounds: int) -> None:
    """Receives every round into the same preallocated tensors: the transport alone, no allocation
    (a fresh buffer per tensor would add ~80 ms of page faults per 400 MB to the floor)."""
    torch.set_num_threads(1)
    group, _ = make_transfer_group("gloo", "127.0.0.1", port, 1, world, 120, 120)
    bufs = [torch.empty(shape, dtype=WIRE_DTYPES[dname]) for shape, dname in zip(shapes, dtypes)]
    for _ in range(rounds):
        for buf in bufs:
            broadcast(group, buf)


class RawGloo:
    """A bare gloo broadcast of `tensors` to one receiving process, one round at a time, so rounds
    can be interleaved with the syncs they are compared against (this box's speed drifts by tens of
    percent within a minute: back-to-back blocks measured the same thing 217 and 317 ms apart)."""

    def __init__(self, tensors: list[torch.Tensor], rounds: int):
        import torch.distributed as dist

        self.tensors = [t.contiguous() for t in tensors]
        port = free_port()
        shapes = [list(t.shape) for t in tensors]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        self.proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, 2, shapes, dtypes, rounds))
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=120))
        self.proc.start()
        self.group, self._store = make_transfer_group("gloo", "127.0.0.1", port, 0, 2, 120, 120, store=store)

    def round_ms(self) -> float:
        t0 = time.perf_counter()
        for t in self.tensors:
            broadcast(self.group, t)
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        self.proc.join(timeout=60)


def time_generation(url: str, n: int, max_tokens: int, repeats: int) -> list[float]:
    """Generated tokens per second of one /generate call (n completions of exactly `max_tokens`)."""
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12]}
    body = {"prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True, "seed": 0}
    requests.post(f"{url}/generate", json=dict(body, max_tokens=4), timeout=600).raise_for_status()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/generate", json=body, timeout=600)
        r.raise_for_status()
        tokens = sum(len(ids) for ids in r.json()["token_ids"])
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def sync_block(server, token: str, model, repeats: int, warmup: int, version: int,
               bucket_bytes: int | None, suffix: str, results: dict[str, list[float]]) -> int:
    """`repeats` pushes (after `warmup`) with `bucket_bytes`, each followed by a raw gloo round of
    the same tensors; the times go to `results` under "<method><suffix>". Returns the last version."""
    sync = WeightSync(WeightSyncConfig(update_timeout_s=120, bucket_bytes=bucket_bytes), [server.url], token)
    sync.connect()
    raw = RawGloo([p.detach() for p in model.parameters()], warmup + repeats)
    methods = ["atropos_sync", "raw_gloo"] + [f"sync_{phase}" for phase in ("prepare", "send", "finish")]
    for method in methods:
        results[method + suffix] = []
    for i in range(warmup + repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0001)  # new content every round, as after an optimizer step
        version += 1
        time.sleep(SETTLE_S)
        m = sync.push(model, version)
        time.sleep(SETTLE_S)
        raw_ms = raw.round_ms()
        if i >= warmup:
            results["atropos_sync" + suffix].append(m["sync/ms"])
            results["raw_gloo" + suffix].append(raw_ms)
            for phase in ("prepare", "send", "finish"):
                results[f"sync_{phase}{suffix}"].append(m[f"sync/{phase}_ms"])
    raw.close()
    sync.close()
    return version


def bench_server(name: str, model, model_dir: Path, work: Path, layout: str, repeats: int,
                 warmup: int, budget=None, buckets: Sequence[int] = ()) -> dict[str, list[float]]:
    """Sync, disk round trip and generation speed on one server started with `layout` (and the
    CPU budget's settings for a run's first server when `budget` is given). Each of `buckets` adds
    a block of syncs with that `bucket_bytes`, its methods suffixed "@b<bytes>"."""
    token = new_update_token()
    plan = budget.child("vllm0") if budget is not None else None
    server = start_vllm_server(model_dir, port=free_port(), log_dir=work / "logs", update_token=token,
                               timeout=900, name=f"vllm_{name}_{layout}", cpu_weight_layout=layout,
                               env=dict(plan.env) if plan else None)
    results: dict[str, list[float]] = {}
    try:
        for n in (1, 16):
            results[f"generate_n{n}"] = time_generation(server.url, n, 64, 3)
        version = sync_block(server, token, model, repeats, warmup, 0, None, "", results)
        for b in buckets:
            version = sync_block(server, token, model, repeats, warmup, version, b, f"@b{b}", results)
        disk = []
        for i in range(warmup + repeats):
            out = work / f"{name}_{layout}_ckpt_{i}"
            version += 1
            t0 = time.perf_counter()
            model.save_pretrained(str(out), safe_serialization=True)
            r = requests.post(f"{server.url}/weights/load_from_disk", json={"path": str(out), "version": version},
                              headers={"Authorization": f"Bearer {token}"}, timeout=600)
            r.raise_for_status()
            if i >= warmup:
                disk.append((time.perf_counter() - t0) * 1e3)
        results["disk_roundtrip"] = disk
    finally:
        server.stop()
    return results


def bench_model(name: str, work: Path, layouts: list[str], repeats: int, warmup: int, budget=None,
                buckets: Sequence[int] = ()) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(work / name, **MODELS[name])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_layout = {layout: bench_server(name, model, model_dir, work, layout, repeats, warmup, budget, buckets)
                  for layout in layouts}
    base = {"model": name, "params": params, "bytes": nbytes}
    rows = []
    for layout, results in per_layout.items():
        for method, values in results.items():
            # x_raw_gloo against the raw rounds interleaved with the same block of syncs
            raw = statistics.median(results["raw_gloo" + (method[method.index("@"):] if "@" in method else "")])
            if method.startswith("generate"):
                rows.append(dict(base, layout=layout, method=method, repeats=len(values),
                                 tok_per_s=round(statistics.median(values), 1)))
                continue
            med = statistics.median(values)
            rows.append(dict(base, layout=layout, method=method, repeats=len(values), ms_median=round(med, 2),
                             ms_min=round(min(values), 2), MB_per_s=round(nbytes / 1e6 / (med / 1e3), 1),
                             x_raw_gloo=round(med / raw, 2)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,100m")
    ap.add_argument("--layouts", default="plain,packed", help="CPU weight layouts of the server to compare")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--buckets", default="",
                    help="comma-separated bucket_bytes values to time in extra blocks of syncs (default: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sync.csv"))
    ap.add_argument("--cpu-budget", choices=("on", "off"), default="on",
                    help="start the server and size this process as a run would (atropos_core.cpu_budget)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = run_meta("cpu")
    layouts = args.layouts.split(",")
    buckets = [int(b) for b in args.buckets.split(",") if b]
    rows = []
    budget = None
    if args.cpu_budget == "on":
        budget = plan_cpu_budget(available_cpus(), num_servers=1, user_env=dict(os.environ))
        apply_to_trainer(budget)
        print(budget.describe())
    meta["cpu_budget"] = args.cpu_budget
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for name in args.models.split(","):
            rows += [dict(meta, **r) for r in bench_model(name, Path(tmp), layouts, args.repeats, args.warmup,
                                                          budget, buckets)]
    append_rows(Path(args.out), CSV_FIELDS, rows)
    print(f"{'model':6} {'layout':7} {'method':22} {'MB':>7} {'ms (median)':>12} {'MB/s':>8} {'x raw':>6} {'tok/s':>8}")
    for r in rows:
        ms = f"{r['ms_median']:12.1f} {r['MB_per_s']:8.1f} {r['x_raw_gloo']:6.2f}" if "ms_median" in r else " " * 28
        tok = f"{r['tok_per_s']:8.1f}" if "tok_per_s" in r else ""
        print(f"{r['model']:6} {r['layout']:7} {r['method']:22} {r['bytes'] / 1e6:7.1f} {ms} {tok}")
    for name in args.models.split(","):
        by = {(r["layout"], r["method"]): r for r in rows if r["model"] == name}
        for layout in layouts:
            raw = by[(layout, "raw_gloo")]["ms_median"]
            sync, disk = by[(layout, "atropos_sync")]["ms_median"], by[(layout, "disk_roundtrip")]["ms_median"]
            print(f"{name} [{layout}]: sync/raw = {sync / raw:.2f}x (target <= 1.3), "
                  f"disk/sync = {disk / sync:.1f}x (target >= 5)")


if __name__ == "__main__":
    main()
