"""What every benchmark shares: the device/commit/date stamped on each row, the long-format CSV
append, and the "extra peak memory" measurement.

Why one copy: rows from different benchmarks, machines and commits are compared side by side
(bench/plot.py, docs), so the device string and the memory definition must be the same everywhere.

Peak memory is the *extra* high-water mark over a baseline taken once the inputs exist. On CUDA it
is `max_memory_allocated` after `reset_peak_memory_stats`; on CPU it is the process's `ru_maxrss`
(torch's CPU allocations are invisible to tracemalloc). `ru_maxrss` never comes down, so a process
can measure only one thing: the benchmarks run each variant in a fresh subprocess.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def device_name(device="cpu") -> str:
    """`cuda: <GPU name>` on CUDA, else `cpu: <model name from /proc/cpuinfo> x<cores>`."""
    if _is_cuda(device):
        import torch

        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} x{os.cpu_count()}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta(device="cpu") -> dict:
    """{"device", "commit", "date"}: the columns every results CSV starts with."""
    return {"device": device_name(device), "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the long-format CSV at `path` (header written when the file is new). When
    `fields` has columns the file lacks, the file is rewritten once with them added (older rows
    get empty cells), so a benchmark can grow a column without losing its history."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            old_rows = list(reader)
        if any(k not in old_fields for k in fields):
            fields = old_fields + [k for k in fields if k not in old_fields]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(old_rows)
        else:
            fields = old_fields
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def run_json_worker(script: Path, args: list[str]) -> dict:
    """Run `python script *args` in a fresh process (from the repo root, importable) and return the
    JSON object on its last stdout line, or {"error": <last 3 lines of its output>} if it failed."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_baseline(device) -> float:
    """MiB in use now (CUDA: allocated, after resetting the peak; CPU: ru_maxrss so far)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_extra_mb(device, baseline: float) -> float:
    """Peak MiB since `memory_baseline(device)` returned `baseline`, minus that baseline."""
    if _is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20 - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
