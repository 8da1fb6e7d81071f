"""The run's services: which child processes a run starts (Atropos API, vLLM server(s),
environments), in which order, with which share of the CPU, and how the other ranks learn where
they are.

`launch_services` (rank 0) turns the config into running children: it first fixes the model
directory (the built-in tiny model by default, built once into `runs/_models/`; a hub id resolved to
its local snapshot) and the run's one sequence length, and checks that the launch can work, so that
a config mistake is reported before anything starts. Then API → vLLM server(s) → environments, each
with its plan from `cpu_budget` (threads, binding, variables) and, on CUDA, its GPUs from
`placement`; `RunServices` holds them, checks them every step (a dead child is named, not a hang)
and stops them in reverse order. `share_launch_info` sends rank 0's URLs, update token, model
directory and length to every rank as a control message (`control`, JSON, not pickle).

How a process is started, waited for and stopped is `procs`; the vLLM command line is
`inference.vllm_command`. The update token goes to vLLM in its environment, never on the command line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import control
from .config import ConfigError, TrainConfig, preset_note
from .cpu_budget import env_names
from .envs import BUILTIN_ENV
from .inference.vllm_command import (CPU_WEIGHT_LAYOUT_ENV, new_update_token, resolve_cpu_weight_layout, served_name_from,
                                     vllm_server_command)
from .model_source import ModelSourceError, check_output_head, resolve_max_token_len, resolve_model_path
from .procs import ManagedProcess, PortTakenError, ServiceError, free_port, port_in_use

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "runs" / "_models" / "repeat_tiny"


@dataclass
class VLLMServerHandle:
    """A running server: its base URL, update token and process."""

    url: str
    token: str
    process: ManagedProcess
    model_dir: Path
    command: tuple = ()

    def stop(self) -> None:
        self.process.stop()

    def alive(self) -> bool:
        return self.process.alive()

    def weight_version(self) -> int | None:
        import requests  # here, not at the top: a run without inference servers needs no requests

        return requests.get(f"{self.url}/weight_version", timeout=10).json()["weight_version"]


def start_vllm_server(model_dir: str | Path, *, port: int, log_dir: str | Path, host: str = "127.0.0.1",
                      update_token: str, extra_args: Sequence[str] = (), timeout: float = 300.0,
                      dtype: str = "float32", max_model_len: int = 512, kv_cache_gib: int = 1,
                      enforce_eager: bool = True, env: dict[str, str] | None = None,
                      name: str = "vllm", cpu_weight_layout: str = "auto",
                      served_model_name: str | None = None,
                      cpus: tuple[int, ...] | None = None) -> VLLMServerHandle:
    """Start our vLLM server on `host:port` and wait until `/health` answers 200.

    Fails fast with the log tail (`procs.ServiceError`) if the process dies while starting.
    `update_token` is the secret the trainer's `WeightSync` sends; generate it with
    `new_update_token()`. `kv_cache_gib` sets `VLLM_CPU_KVCACHE_SPACE` and `cpu_weight_layout`
    ("plain", "packed" or "auto": `resolve_cpu_weight_layout`) how linear weights are held (CPU
    only; see `worker_ext`). `env` and
    `cpus` (the process tree's affinity) come from `cpu_budget` when a run starts the server.
    """
    try:
        cpu_weight_layout, why = resolve_cpu_weight_layout(cpu_weight_layout, model_dir)
    except ValueError as err:
        raise ValueError(f"start_vllm_server: {err}") from None
    if len(update_token) < 16:
        raise ValueError("start_vllm_server: update_token must be at least 16 characters")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("vLLM server %s binds %s: the generation routes are reachable from the network", name, host)
    child_env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "ATROPOS_UPDATE_TOKEN": update_token,
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
                 "DO_NOT_TRACK": "1", CPU_WEIGHT_LAYOUT_ENV: cpu_weight_layout}
    child_env.update(env or {})
    cmd = vllm_server_command(model_dir, port=port, host=host, dtype=dtype, max_model_len=max_model_len,
                              enforce_eager=enforce_eager, extra_args=extra_args, served_model_name=served_model_name)
    proc = ManagedProcess(name, cmd, Path(log_dir) / f"{name}_{port}.log", env=child_env, cpus=cpus).start()
    logger.info("vLLM server %s: CPU weight layout %s (%s; used on CPU only)", name, cpu_weight_layout, why)
    url = f"http://{host}:{port}"
    try:
        proc.wait_http(f"{url}/health", timeout)
    except BaseException:
        proc.stop()
        raise
    logger.info("%s ready at %s (pid %d)", name, url, proc.pid)
    return VLLMServerHandle(url=url, token=update_token, process=proc, model_dir=Path(model_dir), command=tuple(cmd))


API_RUNNER = "atropos_core.run_api"

#: Free ports tried, one after the other, when another process takes the one a child started on.
PORT_TRIES = 3


def on_a_port(start, port: int, host: str):
    """`start(port)`, on `port`, or with 0 on a free port: another one (up to `PORT_TRIES`) when
    another process took the first (`procs.PortTakenError`). A fixed port is tried once."""
    for attempt in range(1 if port else PORT_TRIES):
        p = port or free_port(host)
        try:
            return start(p)
        except PortTakenError as err:
            if port or attempt == PORT_TRIES - 1:
                raise
            logger.warning("%s; starting again on another free port", err)


def start_atropos_api(port: int, log_dir: Path, host: str = "127.0.0.1", timeout: float = 60.0,
                      env: dict | None = None, cpus: tuple[int, ...] | None = None) -> ManagedProcess:
    """Start atroposlib's trajectory API (its app, as `run-api` serves it; successful polls left out
    of the access log: `atropos_core.run_api`) and wait until it answers `/status`."""
    proc = ManagedProcess("atropos-api", [sys.executable, "-m", API_RUNNER, "--host", host, "--port", str(port)],
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
        # One probe per module (a child process importing atroposlib, seconds), not one per server.
        server_type = user_openai["server_type"] if "server_type" in user_openai else env_server_type(module)
        for url in inference_urls:
            entry = dict(server, base_url=f"{url.rstrip('/')}/v1", server_type=server_type)
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
        self.vllm: list[VLLMServerHandle] = []
        self.envs: list[ManagedProcess] = []
        self.token: str = ""

    @property
    def inference_urls(self) -> list[str]:
        return [h.url for h in self.vllm]

    def start_api(self, port: int = 0) -> str:
        def start(p: int) -> int:
            logger.info("starting the Atropos trajectory API on %s:%d", self.host, p)
            self.api = start_atropos_api(p, self.log_dir, host=self.host, **self._share("api"))
            return p

        return f"http://{self.host}:{on_a_port(start, port, self.host)}"

    def start_inference(self, model_dir: str, *, num_servers: int = 1, port: int = 0, host: str = "127.0.0.1",
                        timeout: float = 300.0, extra_args: Sequence[str] = (), dtype: str = "float32",
                        enforce_eager: bool = True, cpu_weight_layout: str = "auto", max_model_len: int = 512,
                        served_model_name: str | None = None, server_envs: Sequence[dict] | None = None,
                        server_extra_args: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Start `num_servers` replicas (one after the other) and write their resolved command lines,
        one a line, to `<run dir>/vllm_commands.txt`. `server_envs[i]` / `server_extra_args[i]`: what
        server i adds to its environment (e.g. its own CUDA_VISIBLE_DEVICES, `atropos_core.placement`)
        and to `extra_args`."""
        self.token = new_update_token()
        urls = []
        for i in range(num_servers):
            if port and port_in_use(port + i, host):
                raise ServiceError(f"inference.port {port + i} is already in use on {host}: pick another or 0 "
                                   "for a free one")
            args_i = list(extra_args) + list(server_extra_args[i] if server_extra_args else [])

            def start(p: int, i: int = i, args_i: list = args_i) -> VLLMServerHandle:
                logger.info("starting vLLM server %d/%d on %s:%d (cold start takes 30-60 s on CPU)", i + 1,
                            num_servers, host, p)
                return start_vllm_server(model_dir, port=p, log_dir=self.log_dir, host=host, update_token=self.token,
                                         extra_args=args_i, timeout=timeout, name=f"vllm{i}", dtype=dtype,
                                         enforce_eager=enforce_eager, cpu_weight_layout=cpu_weight_layout,
                                         max_model_len=max_model_len, served_model_name=served_model_name,
                                         **self._share(f"vllm{i}", server_envs[i] if server_envs else None))

            handle = on_a_port(start, (port + i) if port else 0, host)
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
        share = self._share(kwargs.get("env_name", "env"))  # each environment has its own plan, by name
        proc = start_environment(module, log_dir=self.log_dir, child_env=share["env"], cpus=share["cpus"],
                                 **kwargs)
        self.envs.append(proc)
        return proc

    def _share(self, name: str, extra_env: dict | None = None) -> dict:
        """The budget's environment variables and affinity for child `name` (none without a budget),
        plus `extra_env` (e.g. the placement's CUDA_VISIBLE_DEVICES)."""
        plan = self.budget.child(name) if self.budget is not None else None
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
        def error() -> ServiceError | None:
            try:
                self.check()
            except ServiceError as e:
                return e
            return None

        from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed  # a synthetic run needs none

        poll = Retrying(stop=stop_after_delay(grace_s), wait=wait_fixed(0.2), retry=retry_if_result(lambda e: e is None),
                        retry_error_callback=lambda _state: None)
        return poll(error)

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


# ---- from the config to running children (rank 0), and to every rank -------------------------------

def resolve_model_dir(cfg: TrainConfig) -> TrainConfig:
    """model.path becomes a local model directory (built-in model, a directory, or a hub snapshot)."""
    note = preset_note(cfg)
    if note:
        logger.info(note)
    if not cfg.model.path:
        from .envs.repeat_env import build_default_model

        logger.info("no --model given: using the built-in tiny model (built once into %s)", DEFAULT_MODEL_DIR)
        path = build_default_model(DEFAULT_MODEL_DIR, seed=cfg.run.seed)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
    try:
        path = resolve_model_path(cfg.model.path)
    except ModelSourceError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))


def resolve_lengths(cfg: TrainConfig) -> TrainConfig:
    """Fix the run's one sequence length against the model (model.path must be a local directory):
    run/data/atropos.max_token_len all get it; vLLM's --max-model-len is `cfg.run.max_token_len`."""
    try:
        check_output_head(cfg.model.path)
        n = resolve_max_token_len(cfg.run.max_token_len, cfg.model.path)
    except ModelSourceError as e:
        raise ConfigError(str(e)) from None
    if cfg.run.max_token_len is None:
        logger.info("sequence length %d (model limit, capped at 2048; set --max-token-len to change it)", n)
    # data/atropos.max_token_len follow run.max_token_len (`TrainConfig.__post_init__`).
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_token_len=n))


def check_launchable(cfg: TrainConfig) -> None:
    """Raise ConfigError for a launch that cannot work (no inference server for the environment, a
    fixed inference port already taken), before any child process starts."""
    if cfg.env.start and not cfg.inference.start:
        raise ConfigError("env.start needs an inference server: drop --no-inference or pass --no-env")
    if not (cfg.inference.start and cfg.inference.port):
        return
    for p in range(cfg.inference.port, cfg.inference.port + cfg.inference.num_servers):
        if port_in_use(p, cfg.inference.host):
            raise ConfigError(f"inference.port {p} is already in use on {cfg.inference.host}: pick another, "
                              f"or 0 for a free one")


def launch_services(cfg: TrainConfig, device: torch.device, budget=None) -> tuple[TrainConfig, RunServices]:
    """Start the run's child processes as configured; return the config with their URLs filled in.
    `budget` (`cpu_budget.CpuBudget`) gives each child its threads, binding and variables."""
    model_spec = cfg.model.path or "default"   # the name our OpenAI routes answer to
    cfg = resolve_lengths(resolve_model_dir(cfg))
    check_launchable(cfg)  # config mistakes found here are reported before anything has started
    services = RunServices(Path(cfg.run.out), budget=budget)
    try:
        if cfg.run.start_api:
            url = services.start_api()
            cfg = dataclasses.replace(cfg, atropos=dataclasses.replace(cfg.atropos, url=url))
        urls: list[str] = []
        if cfg.inference.start:
            extra = shlex.split(cfg.inference.extra_args)
            cuda = device.type == "cuda"
            envs = per_server = None
            if cuda:  # each server on its own GPUs where there are free ones (atropos_core.placement)
                envs, per_server = _place_servers(cfg, extra)
            # CPU: fp32 and eager (the CPU backend's tested path). GPU: bf16 with CUDA graphs, and bf16
            # on the wire when the trainer keeps fp32 master weights (half the bytes per sync).
            urls = services.start_inference(cfg.model.path, num_servers=cfg.inference.num_servers,
                                            port=cfg.inference.port, host=cfg.inference.host,
                                            timeout=cfg.inference.startup_timeout_s, extra_args=extra,
                                            dtype="bfloat16" if cuda else "float32", enforce_eager=not cuda,
                                            cpu_weight_layout=cfg.inference.cpu_weight_layout,
                                            server_envs=envs, server_extra_args=per_server,
                                            max_model_len=cfg.run.max_token_len, served_model_name=model_spec)
            if cuda and cfg.sync.wire_dtype is None:
                cfg = dataclasses.replace(cfg, sync=dataclasses.replace(cfg.sync, wire_dtype="bfloat16"))
        if cfg.env.start:
            model_name = served_name_from(shlex.split(cfg.inference.extra_args)) or model_spec
            entries = cfg.env.entries()
            for (module, extra), env_name in zip(entries, env_names(len(entries))):
                if module == BUILTIN_ENV:
                    extra = ["--env.max_new_tokens", str(cfg.env.max_new_tokens), "--env.seed", str(cfg.run.seed),
                             *extra]
                services.start_env(module, api_url=cfg.atropos.url, inference_urls=urls,
                                   tokenizer_dir=cfg.model.path, group_size=cfg.env.group_size,
                                   max_token_len=cfg.atropos.max_token_len, model_name=model_name,
                                   extra_args=extra, env_name=env_name)
    except BaseException:
        services.stop_all()
        raise
    return cfg, services


def _place_servers(cfg: TrainConfig, extra: list[str]):
    """Per-server environments (CUDA_VISIBLE_DEVICES) and extra vLLM arguments, logged."""
    from .placement import PlacementError, log_placement, plan_placement, tensor_parallel_size, visible_gpus

    try:
        plan = plan_placement(visible_gpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                              cfg.inference.num_servers, tensor_parallel_size(extra), cfg.inference.gpus)
    except PlacementError as e:
        raise ConfigError(str(e)) from None
    log_placement(plan)
    n = cfg.inference.num_servers
    return [plan.env(i) for i in range(n)], [plan.extra_args(i, extra) for i in range(n)]


def share_launch_info(cfg: TrainConfig, services, world: int) -> tuple[TrainConfig, str, list[str]]:
    """Every rank gets rank 0's model dir, API URL, inference URLs and update token."""
    info = None
    if services is not None:
        info = {"model": cfg.model.path, "atropos": cfg.atropos.url, "token": services.token,
                "urls": services.inference_urls, "max_token_len": cfg.run.max_token_len}
    if world > 1:
        info = control.broadcast_control(control.message("launch", **info) if info else None)
    n = info["max_token_len"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=info["model"]),
                              atropos=dataclasses.replace(cfg.atropos, url=info["atropos"]),
                              run=dataclasses.replace(cfg.run, max_token_len=n))  # data/atropos lengths follow
    return cfg, info["token"], list(info["urls"])
