"""Weight sync: after each optimizer step the trainer's weights reach every vLLM worker in place.

Three modules (measured numbers: docs/weight_sync.md):

* `protocol`: the wire format both ends import (dtype names, the manifest and its validation and
  key, the bucket plan and packed-bucket layout, per-message timeouts, sampled-sequence keys, the
  update token's header). Light: torch only.
* `transport`: the transfer process group (gloo on CPU, NCCL on CUDA) and broadcasts on it.
* `push`: the trainer side, `WeightSyncConfig` and `WeightSync` (HTTP orchestration of the
  servers' `/weights/*` routes, gathering FSDP2 shards, streaming the broadcast).

The vLLM side (`atropos_core.inference.server`, `.worker_ext`) imports `protocol` and `transport`
only. This package re-exports the names callers use; the trainer-side names (`WeightSync`,
`WeightSyncConfig`) load `push` on first use, so importing the package for the protocol does not
pull in the HTTP client or a thread pool.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The names callers use, re-exported (the wire format, then the transport).
from .protocol import (BUCKET_ALIGN, DTYPE_NAMES, MAX_PIPELINE_DEPTH, MIN_WIRE_BYTES_PER_S, NCCL_BUCKET_BYTES,
                       PAUSE_MODES, PIPELINE_DEPTH, WIRE_DTYPES, WeightSyncError, auth_headers, bucket_layout,
                       build_manifest, clean_param_name, device_id, manifest_key, message_timeout, pack_bucket,
                       plan_buckets, sequence_key, tensor_nbytes, token_refusal, unpack_bucket, validate_manifest)
from .transport import broadcast, broadcast_async, make_transfer_group, pick_backend, wait_done

if TYPE_CHECKING:
    from .push import WeightSync, WeightSyncConfig

_PUSH_NAMES = ("WeightSync", "WeightSyncConfig")

__all__ = [
    "BUCKET_ALIGN", "DTYPE_NAMES", "MAX_PIPELINE_DEPTH", "MIN_WIRE_BYTES_PER_S", "NCCL_BUCKET_BYTES",
    "PAUSE_MODES", "PIPELINE_DEPTH", "WIRE_DTYPES", "WeightSync", "WeightSyncConfig", "WeightSyncError",
    "auth_headers", "broadcast", "broadcast_async", "bucket_layout", "build_manifest", "clean_param_name",
    "device_id", "make_transfer_group", "manifest_key", "message_timeout", "pack_bucket", "pick_backend",
    "plan_buckets", "sequence_key", "tensor_nbytes", "token_refusal", "unpack_bucket", "validate_manifest",
    "wait_done",
]


def __getattr__(name: str):
    if name in _PUSH_NAMES:
        return getattr(importlib.import_module(".push", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
