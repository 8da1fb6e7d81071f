"""Which GPUs the trainer ranks and the vLLM servers of a run use (rank 0's node).

Without placement every child inherits the trainer's `CUDA_VISIBLE_DEVICES`, so every vLLM server
lands on GPU 0 beside trainer rank 0: the weight sync then falls back to gloo through host memory
(NCCL refuses two ranks on one GPU, see `weight_sync.pick_backend`) and an 8B model does not fit
beside its trainer. So each server gets its own `CUDA_VISIBLE_DEVICES`, chosen here:

- The trainer's local ranks use the first `LOCAL_WORLD_SIZE` visible GPUs, in order (`cuda:LOCAL_RANK`,
  as `atropos_core.dist` sets them).
- `inference.gpus = "auto"` (default): the servers take the visible GPUs after the trainer's, each
  `tensor-parallel-size` of them. When too few are left, the servers share the trainer's GPUs
  (colocation, as before): that works, and the log says so, with what it costs.
- `inference.gpus = "colocate"`: share the trainer's GPUs on purpose (one-GPU machines).
- `inference.gpus = "4,5,6,7"` or `"4-7"`: exactly these (physical ids, as `nvidia-smi` numbers
  them, or UUIDs), `tensor-parallel-size` per server in order; they may be GPUs hidden from the
  trainer by its own `CUDA_VISIBLE_DEVICES`, since each child's variable is set outright.

A colocated server gets `--gpu-memory-utilization 0.3` (unless given): the rest is the trainer's.
A server on its own GPUs keeps vLLM's default (0.9). The plan is a pure function of the visible
devices and the config (`plan_placement`), so it is unit-tested without a GPU.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["Placement", "PlacementError", "parse_gpu_list", "visible_gpus", "tensor_parallel_size",
           "plan_placement", "COLOCATED_GPU_MEMORY_UTILIZATION"]

COLOCATED_GPU_MEMORY_UTILIZATION = "0.3"
_MODES = ("auto", "colocate")


class PlacementError(ValueError):
    """A placement that cannot work (too few devices listed, a malformed list)."""


def parse_gpu_list(spec: str) -> list[str]:
    """"4,5,6,7" / "4-7" / "0,2-3" / "GPU-uuid,..." -> ["4", "5", ...]; "" -> []."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise PlacementError(f"inference.gpus: empty range {part!r}")
            out.extend(str(i) for i in range(lo, hi + 1))
        elif re.fullmatch(r"\d+|(GPU|MIG)-[0-9A-Za-z-]+", part):
            out.append(part)
        else:
            raise PlacementError(f"inference.gpus: {part!r} is not a GPU index, range (4-7) or UUID")
    return out


def check_gpus_spec(spec: str) -> None:
    """Raise PlacementError for a malformed `inference.gpus` value (config validation)."""
    if spec not in _MODES:
        if not parse_gpu_list(spec):
            raise PlacementError(f"inference.gpus must be 'auto', 'colocate' or a GPU list like '4,5' or '4-7', "
                                 f"got {spec!r}")


def visible_gpus(environ=None, count: Optional[int] = None) -> list[str]:
    """The GPUs this process may use, as ids for a child's CUDA_VISIBLE_DEVICES: the entries of
    CUDA_VISIBLE_DEVICES when set, else `0 .. count-1` (count: `torch.cuda.device_count()`)."""
    environ = os.environ if environ is None else environ
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [p.strip() for p in mask.split(",") if p.strip()]
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def tensor_parallel_size(extra_args: Sequence[str]) -> int:
    """The `--tensor-parallel-size` / `-tp` in vLLM's extra arguments (1 when absent)."""
    args = list(extra_args)
    for i, a in enumerate(args):
        for flag in ("--tensor-parallel-size", "-tp"):
            if a == flag and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return 1


@dataclass
class Placement:
    trainer: list[str]                       # this node's trainer ranks, in local-rank order
    servers: list[list[str]]                 # per server: its CUDA_VISIBLE_DEVICES entries
    colocated: list[bool] = field(default_factory=list)   # per server: shares a GPU with someone
    reason: str = ""                         # why colocated, when auto had to

    def env(self, i: int) -> dict:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.servers[i])}

    def extra_args(self, i: int, given: Sequence[str]) -> list[str]:
        """vLLM arguments server i adds to `given`: the memory share when colocated."""
        if self.colocated[i] and "--gpu-memory-utilization" not in given:
            return ["--gpu-memory-utilization", COLOCATED_GPU_MEMORY_UTILIZATION]
        return []

    def describe(self) -> str:
        parts = [f"trainer ranks on GPU(s) {','.join(self.trainer)}"]
        for i, devs in enumerate(self.servers):
            parts.append(f"vllm{i} on GPU(s) {','.join(devs)}" + (" (colocated)" if self.colocated[i] else ""))
        return "; ".join(parts)


def plan_placement(visible: Sequence[str], trainer_ranks: int, num_servers: int, gpus_per_server: int = 1,
                   requested: str = "auto") -> Placement:
    """Assign GPUs (see the module docstring). `visible`: this process's GPUs (`visible_gpus`);
    `trainer_ranks`: the trainer's processes on this node (LOCAL_WORLD_SIZE)."""
    visible = list(visible)
    if trainer_ranks < 1 or num_servers < 0 or gpus_per_server < 1:
        raise PlacementError(f"bad placement request: {trainer_ranks} trainer ranks, {num_servers} servers, "
                             f"{gpus_per_server} GPUs per server")
    if len(visible) < trainer_ranks:
        raise PlacementError(f"{trainer_ranks} trainer ranks on this node but only {len(visible)} visible GPU(s) "
                             f"({','.join(visible) or 'none'})")
    trainer = visible[:trainer_ranks]
    need = num_servers * gpus_per_server
    reason = ""
    if requested == "auto":
        free = visible[trainer_ranks:]
        if len(free) >= need:
            pool = free
        else:
            pool = trainer
            reason = (f"{len(free)} GPU(s) free beside {trainer_ranks} trainer rank(s), {num_servers} server(s) x "
                      f"{gpus_per_server} need {need}")
    elif requested == "colocate":
        pool = trainer
        reason = "inference.gpus=colocate"
    else:
        pool = parse_gpu_list(requested)
        if len(pool) < need:
            raise PlacementError(f"inference.gpus lists {len(pool)} GPU(s) ({requested}), but {num_servers} server(s) "
                                 f"x tensor-parallel {gpus_per_server} need {need}")
        if len(pool) > need:
            logger.warning("inference.gpus lists %d GPUs, %d are used: %s", len(pool), need, ",".join(pool[:need]))
    servers = [[pool[(i * gpus_per_server + k) % len(pool)] for k in range(gpus_per_server)] for i in range(num_servers)]
    if any(len(set(s)) < len(s) for s in servers):
        raise PlacementError(f"tensor-parallel {gpus_per_server} needs {gpus_per_server} distinct GPUs per server; "
                             f"only {len(set(pool))} to place on ({','.join(pool)})")
    taken: dict[str, int] = {d: 1 for d in trainer}
    for s in servers:
        for d in s:
            taken[d] = taken.get(d, 0) + 1
    colocated = [any(taken[d] > 1 for d in s) for s in servers]
    return Placement(trainer=trainer, servers=servers, colocated=colocated, reason=reason)


def log_placement(p: Placement) -> None:
    """One info line; a warning when anything shares a GPU (what that costs, how to avoid it)."""
    logger.info("placement: %s", p.describe())
    if any(p.colocated):
        logger.warning("placement: vLLM shares a GPU with the trainer%s: it gets --gpu-memory-utilization %s, and "
                       "the weight sync goes through host memory (gloo; NCCL refuses two ranks on one GPU). "
                       "For NCCL and the whole GPU, leave GPUs free (torchrun --nproc_per_node below the GPU count) "
                       "or set inference.gpus.", f" ({p.reason})" if p.reason else "",
                       COLOCATED_GPU_MEMORY_UTILIZATION)
