"""Shipping: rank 0's raw groups to every rank, as JSON bytes in a uint8 tensor.

Rank 0 fetches the batch and `broadcast_groups` sends the raw groups (length, then payload):
nothing from the network is unpickled, and every rank then runs the same deterministic
`build_train_batch`. Rank 0 sends the bytes `/batch` answered (`AtroposClient.last_raw`) rather than
re-encoding them: encoding is the larger part of the cost (docs/data.md). NaN/Infinity survive the
trip, so the other ranks drop those groups exactly as rank 0 does.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch


def groups_to_json_bytes(groups: Sequence) -> bytes:
    """Encode a batch as compact JSON. NaN/Infinity are kept (as Python's json writes them) so the
    receiving side drops those groups exactly as rank 0 would."""
    return json.dumps(list(groups), separators=(",", ":"), allow_nan=True).encode("utf-8")


def groups_from_json_bytes(data: bytes) -> list[dict]:
    """Decode a batch: a JSON list of groups, or a `/batch` answer `{"batch": [...]}`."""
    out = json.loads(bytes(data).decode("utf-8"))
    if isinstance(out, dict) and isinstance(out.get("batch"), list):
        out = out["batch"]
    if not isinstance(out, list):
        raise ValueError(f"a batch must decode to a JSON list of groups, got {type(out).__name__}")
    return out


def groups_to_tensor(groups: Sequence) -> torch.Tensor:
    """The batch as a 1-D uint8 tensor (for torch.distributed broadcast)."""
    return torch.frombuffer(bytearray(groups_to_json_bytes(groups)), dtype=torch.uint8)


def groups_from_tensor(t: torch.Tensor) -> list[dict]:
    return groups_from_json_bytes(t.detach().to("cpu", torch.uint8).numpy().tobytes())


def broadcast_groups(groups: Optional[Sequence] = None, src: int = 0, group=None,
                     device: torch.device | str = "cpu", raw: Optional[bytes] = None) -> list[dict]:
    """Send the raw groups of global rank `src` to every rank of the process group (length, then
    payload) and return them on every rank. On `src` pass `groups`, or `raw`: the JSON bytes they
    came as (`AtroposClient.last_raw`), which skips re-encoding (JSON encoding is the larger half
    of the cost, see docs/data.md). Other ranks pass nothing. `device` must
    suit the backend ("cuda" for NCCL)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == src:
        if raw is None and groups is None:
            raise ValueError("broadcast_groups: the source rank must pass groups or raw")
        data = raw if raw is not None else groups_to_json_bytes(groups)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if rank != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    if rank == src:
        return list(groups) if groups is not None else groups_from_json_bytes(raw)
    return groups_from_tensor(payload)

