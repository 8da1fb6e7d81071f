"""Weight sync: after each optimizer step the trainer's weights reach every vLLM worker in place.

Three modules (measured numbers: docs/weight_sync.md):

* `protocol`: the wire format both ends import (dtype names, the manifest and its validation and
  key, the bucket plan and packed-bucket layout, per-message timeouts, sampled-sequence keys, the
  update token's header). Light: torch only.
* `transport`: the transfer process group (gloo on CPU, NCCL on CUDA) and broadcasts on it.
* `push`: the trainer side, `WeightSyncConfig` and `WeightSync` (HTTP orchestration of the
  servers' `/weights/*` routes, gathering FSDP2 shards, streaming the broadcast).

The vLLM side (`atropos_core.inference.server`, `.worker_ext`) imports `protocol` and `transport`
only; import them as submodules. The package itself offers the trainer-side `WeightSync` and
`WeightSyncConfig`, loading `push` on first use, so importing the package for the protocol does not
pull in the HTTP client or a thread pool.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .push import WeightSync, WeightSyncConfig

__all__ = ["WeightSync", "WeightSyncConfig"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".push", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
