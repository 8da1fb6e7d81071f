"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

Design: one code path for every world size. Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set) we join a default process group: NCCL when the device is CUDA, gloo
on CPU (the backend follows the device, never a flag). As ONE plain process (no RANK in the
environment) no process group is created: world 1, and the helpers below degrade to no-ops
(`all_reduce_sum` returns its input, `barrier` does nothing). We chose "no group" over a
single-rank group so that a plain `python drivers/train.py` needs no free port and no rendezvous;
`model.apply_fsdp` then leaves the model unsharded. Run under `torchrun --nproc_per_node=1` to get
a one-rank group and FSDP2's mixed precision on one GPU.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["init_distributed", "cleanup", "is_dist", "rank", "world_size", "is_main", "barrier",
           "all_reduce_sum", "all_reduce_max"]


def init_distributed(device: Optional[str] = None, timeout_s: float = 600.0):
    """Join the process group described by torchrun's environment (or none when run plainly).

    Args:
        device: "cpu", "cuda" or None (CUDA when available, else CPU). Under CUDA each rank uses
            `cuda:LOCAL_RANK`.
        timeout_s: collective timeout; a peer that died makes the others fail after this long.
    Returns:
        `(rank, world_size, local_rank, device)`.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    env_rank = os.environ.get("RANK")
    if env_rank is None:
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(dev)
        logger.info("dist: no RANK in the environment: one process, no process group, device %s", dev)
        return 0, 1, 0, dev
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"RANK is set but {missing} are not: launch with torchrun or set them all")
    r, ws = int(env_rank), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", r))
    if device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=r, world_size=ws,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    logger.info("dist: rank %d/%d (local %d) backend %s device %s", r, ws, local, backend, dev)
    return r, ws, local, dev


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _reduce(x, op):
    if not is_dist():
        return x
    if isinstance(x, torch.Tensor):
        out = x.clone()
        dist.all_reduce(out, op=op)
        return out
    # Python numbers travel as float64 on the group's device (CPU for gloo, CUDA for nccl).
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op)
    v = t.item()
    return int(v) if isinstance(x, int) and not isinstance(x, bool) else v


def all_reduce_sum(x):
    """Sum of `x` over ranks (a tensor, or an int/float: the same type comes back). No-op at world 1."""
    return _reduce(x, dist.ReduceOp.SUM if is_dist() else None)


def all_reduce_max(x):
    """Maximum of `x` over ranks; no-op at world 1."""
    return _reduce(x, dist.ReduceOp.MAX if is_dist() else None)
