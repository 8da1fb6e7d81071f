"""Start and stop the child processes of a run (Atropos API, vLLM, environments) on loopback.

Only this module and `drivers/` start processes. Every child runs in its own session
(`start_new_session=True`) so that stopping it by PID takes its whole process tree with it
(vLLM's API server → EngineCore → Worker), and nothing is left holding a port.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

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
        import requests  # here, not at the top: a run without child processes needs no requests

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


ENV_RUNNER = "atropos_core.envs.run_env"


def _split_openai_args(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--openai.FIELD VALUE` (or `=VALUE`) pairs out of an environment's argv."""
    rest, openai = [], {}
    args, i = list(args), 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--openai."):
            if "=" in tok:
                key, val = tok[len("--openai."):].split("=", 1)
                i += 1
            else:
                key, val = tok[len("--openai."):], (args[i + 1] if i + 1 < len(args) else "")
                i += 2
            openai[key] = val
            continue
        rest.append(tok)
        i += 1
    return rest, openai


def env_server_type(module: str, timeout: float = 120.0) -> str:
    """The `server_type` an environment module's own `config_init` asks for ("openai" if it names
    none), read in a short child process so the trainer never imports the environment's code."""
    probe = ("import importlib, inspect, sys\n"
             "from atroposlib.envs.base import BaseEnv\n"
             "m = importlib.import_module(sys.argv[1])\n"
             "envs = [c for _, c in inspect.getmembers(m, inspect.isclass) if issubclass(c, BaseEnv) "
             "and c is not BaseEnv and c.__module__ == m.__name__]\n"
             "cfgs = envs[0].config_init()[1] if envs else None\n"
             "cfg = cfgs[0] if isinstance(cfgs, list) and cfgs else cfgs\n"
             "print('SERVER_TYPE=' + str(getattr(cfg, 'server_type', None) or 'openai'))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", probe, module], capture_output=True, text=True, timeout=timeout,
                         env=env)
    for line in out.stdout.splitlines():
        if line.startswith("SERVER_TYPE="):
            return line.split("=", 1)[1]
    raise ServiceError(f"could not read the server_type of environment module {module!r}: "
                       f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")


def environment_command(module: str, *, api_url: str, inference_urls: Sequence[str], tokenizer_dir: str,
                        group_size: int, max_token_len: int, api_key: str = "local", model_name: str = "default",
                        extra_args: Sequence[str] = (), env_name: str = "env",
                        config_path: Path | None = None) -> list[str]:
    """The argv of one environment process. With one inference server, `--openai.*` flags point
    the environment at it (its own `server_type` stays). With several, atroposlib 0.4.0 accepts
    them only as a YAML list under `openai:` (`--config FILE`; `resolve_openai_configs` refuses
    `--openai.*` flags then): one entry per server, carrying the environment's own `server_type`
    (`env_server_type`) and any `--openai.*` flag of `extra_args`; its `ServerManager` sends each
    request to the server with the most free request slots."""
    cmd = [sys.executable, "-m", ENV_RUNNER, module, "serve",
           "--env.rollout_server_url", api_url,
           "--env.tokenizer_name", str(tokenizer_dir),
           "--env.use_wandb", "false",
           "--env.wandb_name", env_name,
           "--env.group_size", str(group_size),
           "--env.max_token_length", str(max_token_len)]
    rest, user_openai = _split_openai_args(extra_args)
    server = {"base_url": None, "api_key": api_key, "model_name": model_name, "tokenizer_name": str(tokenizer_dir)}
    if len(inference_urls) == 1:
        server["base_url"] = f"{inference_urls[0].rstrip('/')}/v1"
        server.update(user_openai)
        for key, val in server.items():
            cmd += [f"--openai.{key}", str(val)]
    elif len(inference_urls) > 1:
        import yaml

        if config_path is None:
            raise ValueError("environment_command: several inference servers need a config_path for the YAML")
        entries = []
        for url in inference_urls:
            entry = dict(server, base_url=f"{url.rstrip('/')}/v1")
            if "server_type" not in user_openai:
                entry["server_type"] = env_server_type(module)
            entry.update(user_openai)
            entries.append(entry)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump({"openai": entries}, sort_keys=False))
        cmd += ["--config", str(config_path)]
    return cmd + rest


def start_environment(module: str, *, api_url: str, inference_urls: Sequence[str], tokenizer_dir: str,
                      group_size: int, max_token_len: int, log_dir: Path, api_key: str = "local",
                      model_name: str = "default", extra_args: Sequence[str] = (),
                      env_name: str = "env", child_env: dict | None = None,
                      cpus: tuple[int, ...] | None = None) -> ManagedProcess:
    """Start an atroposlib environment (`python -m atropos_core.envs.run_env MODULE serve ...`)
    pointed at our API and every inference server (`environment_command`).

    Offline by construction: wandb off, the tokenizer a local directory, HF hub calls disabled.
    Readiness is not awaited here: an environment registers only after the trainer's first
    `/batch`, so the trainer's wait for data is the readiness check.
    """
    cmd = environment_command(module, api_url=api_url, inference_urls=inference_urls, tokenizer_dir=tokenizer_dir,
                              group_size=group_size, max_token_len=max_token_len, api_key=api_key,
                              model_name=model_name, extra_args=extra_args, env_name=env_name,
                              config_path=log_dir / f"{env_name}_servers.yaml")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",  # atroposlib prints to stdout
           **(child_env or {})}
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
        self.envs: list[ManagedProcess] = []
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
                        enforce_eager: bool = True, cpu_weight_layout: str = "packed", max_model_len: int = 512,
                        served_model_name: str | None = None, server_envs: Sequence[dict] | None = None,
                        server_extra_args: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Start `num_servers` replicas (one after the other) and write their resolved command lines,
        one a line, to `<run dir>/vllm_commands.txt`. `server_envs[i]` / `server_extra_args[i]`: what
        server i adds to its environment (e.g. its own CUDA_VISIBLE_DEVICES, `atropos_core.placement`)
        and to `extra_args`."""
        from .inference.launch import new_update_token, start_vllm_server

        self.token = new_update_token()
        urls = []
        for i in range(num_servers):
            p = (port + i) if port else free_port(host)
            if port and port_in_use(p, host):
                raise ServiceError(f"inference.port {p} is already in use on {host}: pick another or 0 for a free one")
            logger.info("starting vLLM server %d/%d on %s:%d (cold start takes 30-60 s on CPU)", i + 1,
                        num_servers, host, p)
            args_i = list(extra_args) + list(server_extra_args[i] if server_extra_args else [])
            handle = start_vllm_server(model_dir, port=p, log_dir=self.log_dir, host=host, update_token=self.token,
                                       extra_args=args_i, timeout=timeout, name=f"vllm{i}", dtype=dtype,
                                       enforce_eager=enforce_eager, cpu_weight_layout=cpu_weight_layout,
                                       max_model_len=max_model_len, served_model_name=served_model_name,
                                       **self._share(f"vllm{i}", server_envs[i] if server_envs else None))
            self.vllm.append(handle)
            urls.append(handle.url)
            with open(self.log_dir.parent / "vllm_commands.txt", "a") as f:
                f.write(shlex.join(map(str, handle.command)) + "\n")
        return urls

    @property
    def env(self) -> ManagedProcess | None:
        """The first environment process (the only one in a single-environment run)."""
        return self.envs[0] if self.envs else None

    def start_env(self, module: str, **kwargs) -> ManagedProcess:
        share = self._share(kwargs.get("env_name", "env"))
        proc = start_environment(module, log_dir=self.log_dir, child_env=share["env"], cpus=share["cpus"],
                                 **kwargs)
        self.envs.append(proc)
        return proc

    def _share(self, name: str, extra_env: dict | None = None) -> dict:
        """The budget's environment variables and affinity for child `name` (none without a budget;
        every environment process shares the "env" plan), plus `extra_env` (e.g. the placement's
        CUDA_VISIBLE_DEVICES)."""
        plan = self.budget.child(name) if self.budget is not None else None
        if plan is None and self.budget is not None and name.startswith("env"):
            plan = self.budget.child("env")
        env = {**(dict(plan.env) if plan else {}), **(extra_env or {})}
        return {"env": env or None, "cpus": plan.cpus if plan else None}

    def check(self) -> None:
        """Raise ServiceError naming the first child process that is no longer running."""
        procs = ([("Atropos API", self.api)] if self.api else []) + \
                [(f"vLLM server {h.url}", h.process) for h in self.vllm] + \
                [(f"environment {p.name}" if len(self.envs) > 1 else "environment", p) for p in self.envs]
        for name, proc in procs:
            if not proc.alive():
                raise ServiceError(f"{name} (pid {proc.pid}) exited with code {proc.proc.returncode}; "
                                   f"log {proc.log_path}:\n{proc.log_tail(15)}")

    def dead_child(self, grace_s: float = 5.0) -> ServiceError | None:
        """The `check()` error of a child that has died, waiting up to `grace_s` for one to show.

        Called when any call of the run fails: a server killed mid-request fails the request at
        once (connection refused), while its process may need a moment to be reaped or, when only
        an engine process died, to exit; the dead child is the real reason and is reported."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                self.check()
            except ServiceError as e:
                return e
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

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
        for proc in list(reversed(self.envs)) + [h.process for h in reversed(self.vllm)] + [self.api]:
            if proc is not None:
                try:
                    proc.stop()
                except Exception as e:  # noqa: BLE001 - keep stopping the others
                    logger.warning("could not stop %s: %s", proc.name, e)
