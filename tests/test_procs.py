"""Processes and control messages without any server: `procs` stops a whole process tree, also
the parts that ignore SIGTERM or left the process group; `control` carries launch info, "batch" and
"stop" between two real gloo ranks, with a stop's reason intact."""
from __future__ import annotations

import json
import os
import sys
import time

import psutil
import pytest

from atropos_core.procs import ManagedProcess, descendants

# A leader that ignores SIGTERM, with a child that ignores it too and moved to its own session (out
# of reach of a signal to the leader's process group), and a zombie child (exited, never reaped): the
# shape of an orphaned vLLM server whose EngineCore is gone.
TREE = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import os, signal, time; os.setsid(); "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
zombie = subprocess.Popen([sys.executable, "-c", "pass"])
print("started", flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_takes_the_whole_tree(tmp_path):
    proc = ManagedProcess("tree", [sys.executable, "-c", TREE], tmp_path / "tree.log").start()
    try:
        deadline = time.monotonic() + 30
        while len(descendants(proc.pid)) < 2 or "started" not in proc.log_tail():
            assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.1)
        tree = descendants(proc.pid)
        escaped = [p for p in tree if _running(p) and os.getsid(p) != os.getsid(proc.pid)]
        assert escaped, "the test tree has no child outside the leader's session"
        t0 = time.monotonic()
        proc.stop(timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        proc.stop(timeout=1.0)
    deadline = time.monotonic() + 5
    while any(_running(p) for p in [proc.pid, *tree]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in [proc.pid, *tree] if _running(p)], "processes of the tree survived stop()"


def _control_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from atropos_core import control

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    try:
        launch = control.message("launch", urls=["http://127.0.0.1:1"], token="t" * 32) if rank == 0 else None
        out["launch"] = control.broadcast_control(launch)
        if rank == 0:
            control.send_batch_follows()
            control.send_stop("ServiceError: environment (pid 7) exited with code -9 " + "x" * 20000)
        else:
            control.expect_batch()
            out["batch"] = "ok"
            try:
                control.expect_batch()
            except control.StopRequested as e:
                out["stop"] = str(e)
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_control_messages_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_control_worker, args=(str(tmp_path / "init"), str(tmp_path / "got")), nprocs=2,
                       join=True, start_method="fork")
    got = json.loads((tmp_path / "got.1").read_text())
    assert got["launch"] == {"kind": "launch", "urls": ["http://127.0.0.1:1"], "token": "t" * 32}
    assert got["batch"] == "ok"
    assert got["stop"].startswith("rank 0 stopped the run: ServiceError: environment (pid 7) exited with code -9")
    assert got["stop"].endswith("[cut]") and len(got["stop"]) < 16384


def test_control_refuses_unknown_kinds():
    from atropos_core import control

    with pytest.raises(ValueError, match="kind must be one of"):
        control.message("pickle")
