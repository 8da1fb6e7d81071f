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
* A health answer counts only from the child itself: `wait_http` checks (in /proc) that the socket
  listening on the URL's port belongs to the child's process tree. vLLM binds its port with
  SO_REUSEADDR at start but listens only once its engine is up (vLLM 0.32 `setup_server`), and Linux
  lets two such sockets bind one port until one listens; two servers started together on the same
  free port (the port is free until a server listens) then both "started", the second one's health
  wait answered by the first server (seen in CI: a 1024-token server serving the 256-token model).
  `free_port` never hands out a port twice in one process, and a port found answered by another
  process is `PortTakenError`, which the launcher answers by starting on another free port.
* Our child entry modules (the vLLM server, the API, the environment runner) call
  `exit_with_parent`: when the process that started them is gone, they stop, and after a grace
  period SIGKILL their own process group. PDEATHSIG's SIGTERM alone left a vLLM server whose engine
  had died hanging in its shutdown, an orphan holding its port (seen once in CI, after the trainer
  was SIGKILLed), and children started from worker threads get no PDEATHSIG at all.
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
#: Set by `ManagedProcess.start` in every child's environment: the PID of the process that started it.
PARENT_PID_ENV = "ATROPOS_PARENT_PID"


class ServiceError(RuntimeError):
    """A child process failed to start, died, or did not become healthy in time."""


class PortTakenError(ServiceError):
    """The port a child was started on is answered by another process (it took the port first)."""


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


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it), and that this process has not
    handed out before: two servers started side by side never get the same one."""
    with _handed_out_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise ServiceError(f"no free port on {host} that this process has not handed out already")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes of every TCP socket listening on `port` (any address, IPv4 or IPv6), read from
    /proc/net; None where /proc/net cannot be read."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            cols = row.split()
            # local_address is "HEXADDR:HEXPORT"; state 0A is LISTEN; column 9 is the inode.
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(cols[9])
    return found if readable else None


def listens_on(pids: Sequence[int], port: int) -> bool | None:
    """Whether one of `pids` owns a socket listening on `port`: True, False (someone else's
    listener answers there), or None where /proc cannot tell (no /proc, or no listener seen)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return False


def exit_with_parent(grace_s: float = 8.0, poll_s: float = 0.5) -> threading.Thread | None:
    """In a child we started (`PARENT_PID_ENV` set): a daemon thread that, once the process that
    started this one is gone, SIGTERMs this process and, if it is still alive `grace_s` later,
    SIGKILLs its process group (the child's session: its own children too). Nothing without
    `PARENT_PID_ENV` (a process a user started by hand)."""
    try:
        parent = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.warning("the process that started this one (pid %d) is gone: stopping (SIGKILL in %.0f s)",
                       parent, grace_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


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
        env[PARENT_PID_ENV] = str(os.getpid())
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

    def wait_healthy(self, check: Callable[[], bool], timeout: float, what: str = "",
                     port: int | None = None) -> None:
        """Poll `check()` until it is true; fail fast if the process dies, with its log tail. With
        `port`: a true `check()` counts only if the socket listening there is this process tree's
        (`PortTakenError` if it is another process's)."""
        suffix = f" ({what})" if what else ""
        last_note = [time.monotonic()]
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            if not self.alive():
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} "
                                   f"before it was ready{suffix}; last log lines:\n{self.log_tail()}")
            try:
                ok = bool(check())
            except Exception:  # noqa: BLE001 - not up yet
                return False
            if ok and port is not None and listens_on([self.proc.pid, *descendants(self.proc.pid)], port) is False:
                raise PortTakenError(f"{self.name}: port {port} is answered by another process, not by "
                                     f"{self.name} (pid {self.proc.pid}): it took the port first")
            return ok

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
        """Wait until GET `url` answers 200, from this process tree (see `wait_healthy`)."""
        from urllib.parse import urlsplit

        import requests  # here, not at the top: a run without child processes needs no requests

        self.wait_healthy(lambda: requests.get(url, timeout=2).status_code == 200, timeout, what=f"GET {url}",
                          port=urlsplit(url).port)

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
