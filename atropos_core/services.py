"""Start and stop the child processes of a run (Atropos API, vLLM, environments) on loopback.

Only this module and `drivers/` start processes. Every child runs in its own session
(`start_new_session=True`) so that stopping it by PID takes its whole process tree with it
(vLLM's API server → EngineCore → Worker), and nothing is left holding a port.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import requests

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when the process that started it dies,
    so a trainer killed with SIGKILL (no clean-up code runs) leaves no orphaned servers behind."""
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


class ServiceError(RuntimeError):
    """A child process failed to start, died, or did not become healthy in time."""


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
        deadline = time.monotonic() + timeout
        last_note = time.monotonic()
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} before it was "
                    f"ready{(' (' + what + ')') if what else ''}; last log lines:\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() - last_note > 10:
                logger.info("waiting for %s to become ready (%.0f s left)", self.name, deadline - time.monotonic())
                last_note = time.monotonic()
            time.sleep(0.25)
        raise ServiceError(f"{self.name} was not ready within {timeout:.0f} s{(' (' + what + ')') if what else ''};"
                           f" last log lines:\n{self.log_tail()}")

    def wait_http(self, url: str, timeout: float) -> None:
        self.wait_healthy(lambda: requests.get(url, timeout=2).status_code == 200, timeout, what=f"GET {url}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, self.proc.pid)
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Children that outlived the leader still belong to its process group.
        _signal_group(self.proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def venv_bin(name: str) -> str:
    """Path of a console script installed beside the running interpreter (e.g. `run-api`)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def start_atropos_api(port: int, log_dir: Path, host: str = "127.0.0.1", timeout: float = 60.0,
                      env: dict | None = None, cpus: tuple[int, ...] | None = None) -> ManagedProcess:
    """Start atroposlib's trajectory API (`run-api`) and wait until it answers `/status`."""
    proc = ManagedProcess("atropos-api", [venv_bin("run-api"), "--host", host, "--port", str(port)],
                          log_dir / "atropos_api.log", env=env, cpus=cpus).start()
    proc.wait_http(f"http://{host}:{port}/status", timeout)
    return proc


def start_environment(module: str, *, api_url: str, inference_urls: Sequence[str], tokenizer_dir: str,
                      group_size: int, max_token_len: int, log_dir: Path, api_key: str = "local",
                      extra_args: Sequence[str] = (), env_name: str = "env", child_env: dict | None = None,
                      cpus: tuple[int, ...] | None = None) -> ManagedProcess:
    """Start an atroposlib environment (`python -m MODULE serve ...`) pointed at our API and servers.

    Offline by construction: wandb off, the tokenizer a local directory, HF hub calls disabled.
    Readiness is not awaited here: an environment registers only after the trainer's first
    `/batch`, so the trainer's wait for data is the readiness check.
    """
    cmd = [sys.executable, "-m", module, "serve",
           "--env.rollout_server_url", api_url,
           "--env.tokenizer_name", str(tokenizer_dir),
           "--env.use_wandb", "false",
           "--env.wandb_name", env_name,
           "--env.group_size", str(group_size),
           "--env.max_token_length", str(max_token_len)]
    # One server config per inference replica (atroposlib's ServerManager balances over them).
    for url in inference_urls[:1]:
        cmd += ["--openai.base_url", f"{url.rstrip('/')}/v1", "--openai.server_type", "vllm",
                "--openai.api_key", api_key, "--openai.model_name", "default",
                "--openai.tokenizer_name", str(tokenizer_dir)]
    cmd += list(extra_args)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", **(child_env or {})}
    return ManagedProcess(env_name, cmd, log_dir / f"{env_name}.log", env=env, cpus=cpus).start()


class RunServices:
    """The child processes of one run, started in dependency order and stopped in reverse.

    API → vLLM server(s) → environment. Rank 0 of the trainer owns this; `check()` is called every
    step so that a child that died is reported by name instead of as a hang or a stack trace.
    """

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", budget=None):
        self.log_dir = Path(run_dir) / "logs"
        self.host = host
        self.budget = budget  # cpu_budget.CpuBudget: each child's threads, binding and variables
        self.api: ManagedProcess | None = None
        self.vllm: list = []           # inference.launch.VLLMServerHandle
        self.env: ManagedProcess | None = None
        self.token: str = ""

    @property
    def inference_urls(self) -> list[str]:
        return [h.url for h in self.vllm]

    def start_api(self, port: int = 0) -> str:
        port = port or free_port(self.host)
        logger.info("starting the Atropos trajectory API on %s:%d", self.host, port)
        self.api = start_atropos_api(port, self.log_dir, host=self.host, **self._share("api"))
        return f"http://{self.host}:{port}"

    def start_inference(self, model_dir: str, *, num_servers: int = 1, port: int = 0, host: str = "127.0.0.1",
                        timeout: float = 300.0, extra_args: Sequence[str] = (), dtype: str = "float32",
                        enforce_eager: bool = True, cpu_weight_layout: str = "packed") -> list[str]:
        from .inference.launch import new_update_token, start_vllm_server

        self.token = new_update_token()
        urls = []
        for i in range(num_servers):
            p = (port + i) if port else free_port(host)
            if port and port_in_use(p, host):
                raise ServiceError(f"inference.port {p} is already in use on {host}: pick another or 0 for a free one")
            logger.info("starting vLLM server %d/%d on %s:%d (cold start takes 30-60 s on CPU)", i + 1,
                        num_servers, host, p)
            handle = start_vllm_server(model_dir, port=p, log_dir=self.log_dir, host=host, update_token=self.token,
                                       extra_args=extra_args, timeout=timeout, name=f"vllm{i}", dtype=dtype,
                                       enforce_eager=enforce_eager, cpu_weight_layout=cpu_weight_layout,
                                       **self._share(f"vllm{i}"))
            self.vllm.append(handle)
            urls.append(handle.url)
        return urls

    def start_env(self, module: str, **kwargs) -> None:
        share = self._share("env")
        self.env = start_environment(module, log_dir=self.log_dir, child_env=share["env"], cpus=share["cpus"],
                                     **kwargs)

    def _share(self, name: str) -> dict:
        """The budget's environment variables and affinity for child `name` (none without a budget)."""
        plan = self.budget.child(name) if self.budget is not None else None
        return {"env": dict(plan.env) if plan else None, "cpus": plan.cpus if plan else None}

    def check(self) -> None:
        """Raise ServiceError naming the first child process that is no longer running."""
        procs = ([("Atropos API", self.api)] if self.api else []) + \
                [(f"vLLM server {h.url}", h.process) for h in self.vllm] + \
                ([("environment", self.env)] if self.env else [])
        for name, proc in procs:
            if not proc.alive():
                raise ServiceError(f"{name} (pid {proc.pid}) exited with code {proc.proc.returncode}; "
                                   f"log {proc.log_path}:\n{proc.log_tail(15)}")

    def served_versions(self) -> list:
        """The weight version each inference server reports serving (None if it cannot say)."""
        out = []
        for h in self.vllm:
            try:
                out.append(h.weight_version())
            except Exception:  # noqa: BLE001 - reported as unknown; check() names dead servers
                out.append(None)
        return out

    def stop_all(self) -> None:
        for proc in [self.env] + [h.process for h in reversed(self.vllm)] + [self.api]:
            if proc is not None:
                try:
                    proc.stop()
                except Exception as e:  # noqa: BLE001 - keep stopping the others
                    logger.warning("could not stop %s: %s", proc.name, e)
