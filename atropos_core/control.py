"""Control messages from rank 0 to the other trainer ranks: small JSON objects, apart from the
batch payload, so a rank learns what comes next without parsing batch data.

Kinds:
  "launch": once, before the first step: rank 0's model directory, API URL, inference URLs, update
            token and sequence length (`services.share_launch_info`).
  "batch":  a batch follows on the batch broadcast (`data.broadcast_groups`).
  "stop":   rank 0 is stopping (its fetch failed, a child died); `reason` says why; nothing follows.
            The other ranks raise `StopRequested` and leave the loop with rank 0, so every rank
            reaches the collective checkpoint instead of waiting out the collective timeout.

A message is one fixed-size byte buffer (`CONTROL_BYTES`), one collective on the group's host-side
device (`dist.scalar_device`): no length exchange, JSON only (nothing is unpickled).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch

KINDS = ("launch", "batch", "stop")
#: Size of one message on the wire; a longer `reason` is cut to fit.
CONTROL_BYTES = 16384


class StopRequested(RuntimeError):
    """Rank 0 sent "stop": the run ends on this rank too (the message names rank 0's reason)."""


def message(kind: str, **fields: Any) -> dict:
    """A control message of `kind` with its fields (JSON types only)."""
    if kind not in KINDS:
        raise ValueError(f"control message kind must be one of {KINDS}, got {kind!r}")
    return {"kind": kind, **fields}


def _encode(msg: dict) -> bytes:
    data = json.dumps(msg).encode()
    if len(data) > CONTROL_BYTES and isinstance(msg.get("reason"), str):
        cut = len(msg["reason"]) - (len(data) - CONTROL_BYTES) - 16
        data = json.dumps(dict(msg, reason=msg["reason"][:max(cut, 0)] + " [cut]")).encode()
    if len(data) > CONTROL_BYTES:
        raise ValueError(f"control message of {len(data)} bytes exceeds CONTROL_BYTES={CONTROL_BYTES}")
    return data


def broadcast_control(msg: Optional[dict] = None, src: int = 0, group=None) -> dict:
    """Send `msg` from global rank `src` (others pass nothing) and return it on every rank."""
    import torch.distributed as dist

    from .dist import scalar_device

    buf = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
    if dist.get_rank() == src:
        if msg is None or msg.get("kind") not in KINDS:
            raise ValueError(f"broadcast_control: the source rank must send a message of a kind in {KINDS}")
        data = _encode(msg)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(scalar_device(group))
    dist.broadcast(buf, src=src, group=group)
    if dist.get_rank() == src:
        return msg
    received = json.loads(buf.cpu().numpy().tobytes().rstrip(b"\0"))  # JSON escapes NUL: the tail is padding
    if not isinstance(received, dict) or received.get("kind") not in KINDS:
        raise ValueError(f"control message of unknown kind from rank {src}: {str(received)[:200]}")
    return received


def send_stop(reason: str) -> None:
    """Rank 0: tell the other ranks the run stops, and why."""
    broadcast_control(message("stop", reason=reason))


def send_batch_follows() -> None:
    """Rank 0: tell the other ranks a batch follows on the batch broadcast."""
    broadcast_control(message("batch"))


def expect_batch() -> None:
    """Ranks > 0: wait for rank 0's next message; raise `StopRequested` if it is "stop"."""
    msg = broadcast_control()
    if msg["kind"] == "stop":
        raise StopRequested(f"rank 0 stopped the run: {msg.get('reason', '')}")
    if msg["kind"] != "batch":
        raise ValueError(f"expected a 'batch' control message from rank 0, got {msg['kind']!r}")
