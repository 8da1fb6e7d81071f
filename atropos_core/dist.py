"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

Design: one code path for every world size. Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set) we join a default process group whose backend follows the device,
never a flag (`process_group_backend`): gloo on CPU; on CUDA `"cpu:gloo,cuda:nccl"`, so that every
collective runs on the backend of its tensor's device. A CPU tensor on an NCCL-only group fails
("No backend type associated with device type cpu"), and several CPU-side collectives exist on
purpose (the control messages and the batch as JSON bytes, python numbers in `all_reduce_*`, DCP's
metadata, the weight sync's failure flag): with the mixed group none of them needs a device.

As ONE plain process (no RANK in the environment): on CPU no process group is created (world 1,
the helpers below degrade to no-ops, `model.apply_fsdp` leaves the model unsharded; no free port,
no rendezvous). On CUDA a one-rank group is created on an in-process store (`HashStore`: no port
either), so that FSDP2 applies and brings its mixed precision: bf16 compute on fp32 master weights
with fp32 gradient reduction. Without it a plain `python drivers/train.py` on one GPU would train
in fp32 (and flash-attn, which refuses fp32, could not run). `single_rank_group=True` forces the
same on CPU (tests run the one-rank FSDP path on gloo).
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
           "all_reduce_sum", "all_reduce_max", "process_group_backend", "scalar_device"]


def process_group_backend(device_type: str) -> str:
    """The default group's backend for a trainer on `device_type`: "gloo" on CPU, and on CUDA
    "cpu:gloo,cuda:nccl" (NCCL for CUDA tensors, gloo for the CPU ones; see the module docstring)."""
    if device_type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"device type must be 'cpu' or 'cuda', got {device_type!r}")


def init_distributed(device: Optional[str] = None, timeout_s: float = 600.0,
                     single_rank_group: Optional[bool] = None):
    """Join the process group described by torchrun's environment (or a one-rank / no group when
    run plainly: see the module docstring).

    Args:
        device: "cpu", "cuda" or None (CUDA when available, else CPU). Under CUDA each rank uses
            `cuda:LOCAL_RANK`.
        timeout_s: collective timeout; a peer that died makes the others fail after this long.
        single_rank_group: for a plain process (no RANK): create a one-rank group. None = on CUDA
            only (FSDP2's bf16 mixed precision needs a group).
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
        if single_rank_group is None:
            single_rank_group = device == "cuda"
        if single_rank_group and not dist.is_initialized():
            backend = process_group_backend(device)
            kwargs = {"device_id": dev} if device == "cuda" else {}
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s), **kwargs)
            logger.info("dist: one process: a one-rank group (%s, in-process store) so that FSDP2 brings "
                        "mixed precision; device %s", backend, dev)
        else:
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
    else:
        dev = torch.device("cpu")
    backend = process_group_backend(device)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if device == "cuda" else {}
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


def scalar_device(group=None) -> torch.device:
    """Where a small host-side value should travel on `group`: CPU whenever the group has gloo
    (ours always do), the current CUDA device only on an NCCL-only group (one made elsewhere)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _reduce(x, op):
    if not is_dist():
        return x
    if isinstance(x, torch.Tensor):
        out = x.clone()
        dist.all_reduce(out, op=op)
        return out
    # Python numbers travel as float64 on CPU (gloo; no device round trip), see `scalar_device`.
    t = torch.tensor(float(x), dtype=torch.float64, device=scalar_device())
    dist.all_reduce(t, op=op)
    v = t.item()
    return int(v) if isinstance(x, int) and not isinstance(x, bool) else v


def all_reduce_sum(x):
    """Sum of `x` over ranks (a tensor, or an int/float: the same type comes back). No-op at world 1."""
    return _reduce(x, dist.ReduceOp.SUM if is_dist() else None)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of `model`'s parameters (of their local shard under FSDP2)."""
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


def all_reduce_max(x):
    """Maximum of `x` over ranks; no-op at world 1."""
    return _reduce(x, dist.ReduceOp.MAX if is_dist() else None)
