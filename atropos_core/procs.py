"""Child processes and ports: start a process in its own session, wait until it is healthy, stop
its whole process tree; find free ports.

Nothing here knows what a run starts (that is `services`). Decisions:

* Every child runs in its own session (`start_new_session=True`), so stopping it by PID signals
  its whole process group (vLLM's API server → EngineCore → Worker) and nothing is left holding a
  port. Descendants are also collected from `/proc` before the signal, so one that left the group
  (or outlived a leader that is already gone) is stopped too.
* Children started from the main thread ask Linux for PDEATHSIG (SIGTERM when the trainer dies), so
  a trainer killed with SIGKILL, where no clean-up code runs, leaves no servers behind.
* A child's output goes to its own log file; a failed start is reported with the log's tail.
* Health waits poll (tenacity) and fail fast, naming the process, when it dies while starting.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A child process failed to start, died, or did not become healthy in time."""


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux: clean shutdown still stops children
        pass


def _child_setup(die_with_parent: bool, cpus) -> Callable[[], None] | None:
    """What runs in a child before exec: PDEATHSIG (see `_die_with_parent`) and its CPU affinity."""
    if not die_with_parent and not cpus:
        return None

    def setup() -> None:
        if die_with_parent:
            _die_with_parent()
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except (OSError, AttributeError):  # a cpuset that forbids it: run unpinned
                pass
    return setup


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (children first), read from /proc; [] where there is none."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> str | None:
    """The start time of `pid` (field 22 of /proc/<pid>/stat), which tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal_pids(pids: dict[int, str | None], sig: int) -> None:
    """Signal each of `pids` ({pid: start time}) that is still the process it was when recorded."""
    for p, started in pids.items():
        if started is None or _start_time(p) != started:
            continue  # gone, or its PID now belongs to another process
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class ManagedProcess:
    """A child process in its own session, with its output in a log file."""

    name: str
    cmd: Sequence[str]
    log_path: Path
    env: dict | None = None
    cwd: str | None = None
    cpus: tuple[int, ...] | None = None
    """CPU affinity of the child (from `cpu_budget`); None leaves it unpinned."""
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.update(self.env or {})
        logger.info("starting %s: %s (log: %s)", self.name, " ".join(map(str, self.cmd)), self.log_path)
        self.proc = subprocess.Popen(
            list(map(str, self.cmd)), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=self.cwd, start_new_session=True,
            # PDEATHSIG fires when the starting *thread* exits: only tie children to the main thread.
            preexec_fn=_child_setup(threading.current_thread() is threading.main_thread(), self.cpus),
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(self, check: Callable[[], bool], timeout: float, what: str = "") -> None:
        """Poll `check()` until it is true; fail fast if the process dies, with its log tail."""
        suffix = f" ({what})" if what else ""
        last_note = [time.monotonic()]
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            if not self.alive():
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} "
                                   f"before it was ready{suffix}; last log lines:\n{self.log_tail()}")
            try:
                return bool(check())
            except Exception:  # noqa: BLE001 - not up yet
                return False

        def note(_state) -> None:
            if time.monotonic() - last_note[0] > 10:
                logger.info("waiting for %s to become ready (%.0f s left)", self.name, deadline - time.monotonic())
                last_note[0] = time.monotonic()

        from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed  # a synthetic run needs none

        poll = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.25), before_sleep=note,
                        retry=retry_if_result(lambda ok: not ok), retry_error_callback=lambda _state: False)
        if not poll(ready):
            raise ServiceError(f"{self.name} was not ready within {timeout:.0f} s{suffix}; last log lines:\n"
                               f"{self.log_tail()}")

    def wait_http(self, url: str, timeout: float) -> None:
        import requests  # here, not at the top: a run without child processes needs no requests

        self.wait_healthy(lambda: requests.get(url, timeout=2).status_code == 200, timeout, what=f"GET {url}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process tree (its group and every descendant), then SIGKILL what is
        left after `timeout`."""
        if self.proc is None:
            return
        tree = {p: _start_time(p) for p in descendants(self.proc.pid)}
        if self.proc.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, self.proc.pid)
            _signal_group(self.proc.pid, signal.SIGTERM)
            _signal_pids(tree, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Children that outlived the leader: still in its process group, or found in the tree above.
        _signal_group(self.proc.pid, signal.SIGKILL)
        _signal_pids(tree, signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()
