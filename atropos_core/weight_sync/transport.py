"""The weight-sync transport: one process group for the transfer only, and broadcasts on it.

The group is built directly from a `TCPStore` as a `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL`
(CUDA) and never registered as a global group, so it lives beside the trainer's own FSDP group and
vLLM's internal groups. Trainer rank 0 is rank 0 of the group and the root of every broadcast; the
workers of every server take the following ranks. Both ends call `make_transfer_group`, so they
agree on store prefix, backend and timeouts.

* gloo's per-collective timeout is the per-message timeout: short, because a worker that died
  mid-broadcast otherwise hangs the trainer.
* NCCL's `wait()` does not block the host, so `wait_done` polls the work on the host with its own
  per-message timeout, and the group's watchdog is set to abort the communicator without killing
  the process (a failed update inside a vLLM worker must fail the update only, not the engine).
* `pick_backend` refuses NCCL where two ranks would share one GPU (NCCL >= 2.5 refuses it,
  "Duplicate GPU detected", NVIDIA/nccl#418) and falls back to gloo for "auto".
"""
from __future__ import annotations

import datetime
import os
import time

import torch

from .protocol import MAX_PIPELINE_DEPTH, WeightSyncError

def make_transfer_group(backend: str, host: str, port: int, rank: int, world_size: int,
                        init_timeout_s: float, op_timeout_s: float, *, store=None):
    """A process group for the transfer only, built from a TCPStore and never registered globally.

    Rank 0 (the trainer) hosts the store; pass it as `store` there. Blocks until all `world_size`
    ranks have joined (or `init_timeout_s`). Returns `(group, store)`.
    """
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=init_timeout_s))
    prefixed = dist.PrefixStore("atropos_weight_sync", store)
    timeout = datetime.timedelta(seconds=op_timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Bind to loopback when the trainer is local: the default device resolves the hostname,
        # which need not be reachable on a locked-down machine.
        iface_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else ""
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=iface_host)]
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    elif backend == "nccl":
        nccl_cls = getattr(dist, "ProcessGroupNCCL", None)
        if nccl_cls is None:
            raise WeightSyncError("backend 'nccl' requested but this torch build has no NCCL")
        opts = nccl_cls.Options()
        # The per-message timeout is enforced on the host (`wait_done`); the watchdog is only the
        # backstop that frees a hung communicator, so it must not fire first: a message may be
        # enqueued up to MAX_PIPELINE_DEPTH messages before it can run.
        opts._timeout = datetime.timedelta(seconds=op_timeout_s * (MAX_PIPELINE_DEPTH + 2))
        group = _nccl_group_without_teardown(nccl_cls, prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"unknown transfer backend {backend!r}")
    return group, store


def pick_backend(requested: str, trainer_device: str,
                 server_devices: dict[str, list[str] | None]) -> tuple[str, str]:
    """The transfer backend for `requested` ("auto", "gloo", "nccl"), and why it differs from the
    obvious choice ("" when it does not).

    "auto" means NCCL when the trainer is on a GPU, except when two ranks of the group would sit on
    one GPU (trainer and a vLLM worker colocated, or two replicas sharing a GPU): NCCL >= 2.5
    refuses that ("Duplicate GPU detected", ncclInvalidUsage; NVIDIA/nccl#418), so gloo carries the
    tensors through host memory instead (slower, but it works). Asking for "nccl" in that case is an
    error raised here, before any group is formed.
    """
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"unknown transfer backend {requested!r}")
    if requested == "gloo" or (requested == "auto" and not trainer_device.startswith("cuda")):
        return "gloo", ""
    owners: dict[str, str] = {trainer_device: "the trainer"}
    for url, devices in server_devices.items():
        for i, dev in enumerate(devices or []):
            if not dev.startswith("cuda"):
                if requested == "nccl":
                    raise WeightSyncError(f"backend 'nccl' requested but worker {i} of {url} runs on {dev}")
                return "gloo", f"worker {i} of {url} runs on {dev}, not a GPU"
            if dev in owners:
                why = (f"{owners[dev]} and worker {i} of {url} share GPU {dev.removeprefix('cuda:')}, and NCCL "
                       f"refuses two ranks on one GPU")
                if requested == "nccl":
                    raise WeightSyncError(f"backend 'nccl' cannot work here: {why}; use backend 'gloo' or 'auto'")
                return "gloo", why
            owners[dev] = f"worker {i} of {url}"
    return "nccl", ""


def _nccl_group_without_teardown(nccl_cls, store, rank: int, world_size: int, opts):
    """A ProcessGroupNCCL whose watchdog, on a timeout or NCCL error, aborts the communicator and
    leaves the process alive (TORCH_NCCL_ASYNC_ERROR_HANDLING=2, "CleanUpOnly"). The default (3,
    "SkipCleanUp") kills the process: inside a vLLM worker that is the whole engine, where a failed
    update must only fail the update. The variable is read by the constructor, so it is set for
    this group only and restored afterwards (vLLM's own groups keep their setting)."""
    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    old = os.environ.get(key)
    os.environ[key] = "2"
    try:
        return nccl_cls(store, rank, world_size, opts)
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def broadcast_async(group, tensor: torch.Tensor):
    """Start broadcasting `tensor` from rank 0 of `group` (in place on the receivers); returns the
    work handle. `tensor` must stay alive until `.wait()` returns."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


def wait_done(work, timeout_s: float, *, host_poll: bool, what: str = "message") -> None:
    """Wait for one transfer message; with `host_poll` (NCCL) block the HOST, at most `timeout_s`.

    gloo's `wait()` already blocks the host (and its group timeout is per collective). NCCL's only
    makes the current stream wait: a loop of post-and-wait would enqueue a whole update at once,
    every buffer alive (a second copy of the model on the worker) and NCCL's watchdog timing the
    last message from the moment it was enqueued. Polling `is_completed()` first keeps at most the
    caller's `pipeline_depth` messages in flight, makes the timeout one message's, and turns a hung
    transfer into a WeightSyncError on the host before any stream is chained to it (the watchdog,
    set to CleanUpOnly by `make_transfer_group`, then aborts the communicator without killing the
    process). `work.wait()` afterwards orders the current stream and raises the work's own error."""
    if host_poll:
        deadline = time.monotonic() + timeout_s
        pause = 5e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise WeightSyncError(f"{what} not transferred within {timeout_s:.0f} s (per-message timeout)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
    work.wait()


def broadcast(group, tensor: torch.Tensor) -> None:
    """Broadcast `tensor` from rank 0 of `group`; blocks until done."""
    broadcast_async(group, tensor).wait()
