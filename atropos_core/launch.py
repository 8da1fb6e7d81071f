"""Bring up what a run needs before the first step: the model directory, and (rank 0 only) the
Atropos API, the vLLM server(s) and the built-in environment, each as a child process.

The default run (no `--model`) builds the tiny model of `atropos_core.envs.repeat_env` once into
`runs/_models/` (cached: later runs start in seconds) and says, once, that the demo preset is in
use. A `--model` hub id is resolved here to its local snapshot, and the run's one sequence length
is fixed against the model's limit (`model_source`), before any child process starts. Other ranks
learn the URLs, the update token, the model directory and the length from rank 0 over the
trainer's own process group (JSON, not pickle).
"""
from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig, preset_note
from .inference.launch import served_name_from
from .model_source import ModelSourceError, resolve_max_token_len, resolve_model_path
from .services import RunServices

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "runs" / "_models" / "repeat_tiny"
BUILTIN_ENV = "atropos_core.envs.repeat_env"


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
        n = resolve_max_token_len(cfg.run.max_token_len, cfg.model.path)
    except ModelSourceError as e:
        raise ConfigError(str(e)) from None
    if cfg.run.max_token_len is None:
        logger.info("sequence length %d (model limit, capped at 2048; set --max-token-len to change it)", n)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_token_len=n),
                               data=dataclasses.replace(cfg.data, max_token_len=n),
                               atropos=dataclasses.replace(cfg.atropos, max_token_len=n))


def check_launchable(cfg: TrainConfig) -> None:
    """Raise ConfigError for a launch that cannot work (no inference server for the environment, a
    fixed inference port already taken), before any child process starts."""
    from .services import port_in_use

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
            specs = cfg.env.module_specs
            for i, spec in enumerate(specs):
                module, *own = shlex.split(spec)
                extra = shlex.split(cfg.env.extra_args) + own
                if module == BUILTIN_ENV:
                    extra = ["--env.max_new_tokens", str(cfg.env.max_new_tokens), "--env.seed", str(cfg.run.seed),
                             *extra]
                services.start_env(module, api_url=cfg.atropos.url, inference_urls=urls,
                                   tokenizer_dir=cfg.model.path, group_size=cfg.env.group_size,
                                   max_token_len=cfg.atropos.max_token_len, model_name=model_name,
                                   extra_args=extra, env_name="env" if len(specs) == 1 else f"env{i}")
    except BaseException:
        services.stop_all()
        raise
    return cfg, services


def _place_servers(cfg: TrainConfig, extra: list[str]):
    """Per-server environments (CUDA_VISIBLE_DEVICES) and extra vLLM arguments, logged."""
    import os

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
        from .batch import broadcast_groups

        from .dist import scalar_device

        # JSON bytes as a CPU tensor: gloo's half of the default group (on an NCCL-only group a CPU
        # tensor has no backend; see atropos_core.dist).
        info = broadcast_groups([info] if info else None, device=scalar_device())[0]
    n = info["max_token_len"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=info["model"]),
                              atropos=dataclasses.replace(cfg.atropos, url=info["atropos"], max_token_len=n),
                              run=dataclasses.replace(cfg.run, max_token_len=n),
                              data=dataclasses.replace(cfg.data, max_token_len=n))
    return cfg, info["token"], list(info["urls"])
