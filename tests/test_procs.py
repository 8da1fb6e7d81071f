"""Processes and control messages without any server: `procs` stops a whole process tree, also
the parts that ignore SIGTERM or left the process group; a child whose parent was SIGKILLed stops
itself and its group; a health answer counts only from the child's own socket; free ports are not
handed out twice; `control` carries launch info, "batch" and "stop" between two real gloo ranks,
with a stop's reason intact."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from atropos_core.procs import ManagedProcess, PortTakenError, descendants, free_port, listens_on
from atropos_core.services import PORT_TRIES, on_a_port

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


# A trainer stand-in: starts (from its main thread, as the launcher does) a child that ignores SIGTERM,
# runs `exit_with_parent` like our entry modules and has a child of its own in its process group;
# prints both PIDs. The stand-in is then SIGKILLed: no clean-up code of it runs.
ORPHAN_PARENT = r"""
import subprocess, sys, time
from pathlib import Path
from atropos_core.procs import ManagedProcess
child = ManagedProcess("child", [sys.executable, "-c", sys.argv[2]], Path(sys.argv[1])).start()
print("child", child.pid, flush=True)
time.sleep(600)
"""
ORPHAN_CHILD = r"""
import signal, subprocess, sys, time
from atropos_core.procs import exit_with_parent
signal.signal(signal.SIGTERM, signal.SIG_IGN)
exit_with_parent(grace_s=1.0, poll_s=0.1)
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("grandchild", grandchild.pid, flush=True)
time.sleep(600)
"""


def _wait_for_line(path, word: str, proc: ManagedProcess, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (path.read_text() if path.exists() else "").splitlines():
            if line.startswith(word + " "):
                return int(line.split()[1])
        assert proc.alive(), proc.log_tail()
        time.sleep(0.1)
    raise AssertionError(f"no {word!r} line in {path}: {proc.log_tail()}")


def test_orphaned_child_that_ignores_sigterm_stops_with_its_group(tmp_path):
    """The shape of the CI failure: a vLLM server that ignores the SIGTERM (PDEATHSIG) it got when
    its trainer was SIGKILLed. `exit_with_parent` SIGKILLs its process group after the grace."""
    parent = ManagedProcess("parent", [sys.executable, "-c", ORPHAN_PARENT, str(tmp_path / "child.log"), ORPHAN_CHILD],
                            tmp_path / "parent.log").start()
    try:
        child = _wait_for_line(tmp_path / "parent.log", "child", parent)
        grandchild = _wait_for_line(tmp_path / "child.log", "grandchild", parent)
        assert _running(child) and _running(grandchild)
        os.kill(parent.pid, signal.SIGKILL)
        parent.proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (_running(child) or _running(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the orphaned child survived its parent's death"
        assert not _running(grandchild), "the orphaned child's own child survived"
        assert "is gone: stopping" in (tmp_path / "child.log").read_text()
    finally:
        parent.stop(timeout=1.0)
        for pid in locals().get("child", None), locals().get("grandchild", None):
            if pid and _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_free_port_is_never_handed_out_twice():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_listens_on_tells_the_owner_of_a_port():
    port = free_port()
    assert listens_on([os.getpid()], port) is None  # nobody listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert listens_on([os.getpid()], port) is None  # bound, not listening: what vLLM does first
        s.listen()
        assert listens_on([os.getpid()], port) is True
        assert listens_on([os.getppid()], port) is False


def test_health_answered_by_another_process_is_port_taken(tmp_path):
    """Two servers on one port: the child waits on a port that this (test) process answers."""
    foreign = ThreadingHTTPServer(("127.0.0.1", free_port()), _Ok)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    squatter = ManagedProcess("late", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "late.log").start()
    own_port = free_port()
    own = ManagedProcess("own", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(own_port)],
                         tmp_path / "own.log").start()
    try:
        with pytest.raises(PortTakenError, match=f"port {port} is answered by another process"):
            squatter.wait_http(f"http://127.0.0.1:{port}/", timeout=20)
        own.wait_http(f"http://127.0.0.1:{own_port}/", timeout=30)  # its own answer counts
    finally:
        foreign.shutdown()
        squatter.stop(timeout=1.0)
        own.stop(timeout=1.0)


def test_on_a_port_moves_on_when_the_port_was_taken():
    tried = []

    def start(p: int) -> int:
        tried.append(p)
        if len(tried) < PORT_TRIES:
            raise PortTakenError(f"port {p} is answered by another process")
        return p

    assert on_a_port(start, 0, "127.0.0.1") == tried[-1]
    assert len(set(tried)) == PORT_TRIES
    tried.clear()
    with pytest.raises(PortTakenError):  # a port the user fixed is not swapped for another
        on_a_port(start, 12345, "127.0.0.1")
    assert tried == [12345]

    def always_taken(p: int) -> int:
        tried.append(p)
        raise PortTakenError(f"port {p} is answered by another process")

    tried.clear()
    with pytest.raises(PortTakenError):  # nor tried forever
        on_a_port(always_taken, 0, "127.0.0.1")
    assert len(tried) == PORT_TRIES


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
