"""Bring up what a run needs before the first step: the model directory, and (rank 0 only) the
Atropos API, the vLLM server(s) and the built-in environment, each as a child process.

The default run (no `--model`) builds the tiny model of `atropos_core.envs.repeat_env` once into
`runs/_models/` (cached: later runs start in seconds). Other ranks learn the URLs, the update
token and the model directory from rank 0 over the trainer's own process group (JSON, not pickle).
"""
from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .services import RunServices

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "runs" / "_models" / "repeat_tiny"
BUILTIN_ENV = "atropos_core.envs.repeat_env"


def resolve_model_dir(cfg: TrainConfig) -> TrainConfig:
    if not cfg.model.path:
        from .envs.repeat_env import build_default_model

        logger.info("no --model given: using the built-in tiny model (built once into %s)", DEFAULT_MODEL_DIR)
        path = build_default_model(DEFAULT_MODEL_DIR, seed=cfg.run.seed)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
    p = Path(cfg.model.path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path {str(p)!r} is not a Hugging Face model directory (no config.json there)")
    return cfg


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
    cfg = resolve_model_dir(cfg)
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
            if cuda and "--gpu-memory-utilization" not in extra:
                extra += ["--gpu-memory-utilization", "0.3"]  # leave the rest of the GPU to the trainer
            # CPU: fp32 and eager (the CPU backend's tested path). GPU: bf16 with CUDA graphs, and bf16
            # on the wire when the trainer keeps fp32 master weights (half the bytes per sync).
            urls = services.start_inference(cfg.model.path, num_servers=cfg.inference.num_servers,
                                            port=cfg.inference.port, host=cfg.inference.host,
                                            timeout=cfg.inference.startup_timeout_s, extra_args=extra,
                                            dtype="bfloat16" if cuda else "float32", enforce_eager=not cuda,
                                            cpu_weight_layout=cfg.inference.cpu_weight_layout)
            if cuda and cfg.sync.wire_dtype is None:
                cfg = dataclasses.replace(cfg, sync=dataclasses.replace(cfg.sync, wire_dtype="bfloat16"))
        if cfg.env.start:
            extra = shlex.split(cfg.env.extra_args)
            if cfg.env.module == BUILTIN_ENV:
                extra += ["--env.max_new_tokens", str(cfg.env.max_new_tokens), "--env.seed", str(cfg.run.seed)]
            services.start_env(cfg.env.module, api_url=cfg.atropos.url, inference_urls=urls,
                               tokenizer_dir=cfg.model.path, group_size=cfg.env.group_size,
                               max_token_len=cfg.atropos.max_token_len, extra_args=extra)
    except BaseException:
        services.stop_all()
        raise
    return cfg, services


def share_launch_info(cfg: TrainConfig, services, world: int) -> tuple[TrainConfig, str, list[str]]:
    """Every rank gets rank 0's model dir, API URL, inference URLs and update token."""
    info = None
    if services is not None:
        info = {"model": cfg.model.path, "atropos": cfg.atropos.url, "token": services.token,
                "urls": services.inference_urls}
    if world > 1:
        from .batch import broadcast_groups

        info = broadcast_groups([info] if info else None)[0]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=info["model"]),
                              atropos=dataclasses.replace(cfg.atropos, url=info["atropos"]))
    return cfg, info["token"], list(info["urls"])
