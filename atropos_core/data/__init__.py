"""Atropos groups → training tensors. What a batch passes through, in order:

- `ship`: rank 0's raw `/batch` bytes to every rank (JSON in a uint8 tensor, never pickle).
- `validate`: each group checked whole; a bad one dropped with a reason and a counter.
- `advantages`: GRPO advantages from scores (or the environment's own), whitening, clipping.
- `pack`: sequences shifted to next-token rows, planned into micro-batches under a token budget,
  padded or packed into `MicroBatch` tensors; `split_for_ranks` shares them out.
- `build`: `build_train_batch`, the one entry point that runs validate → advantages → pack.
- `config`: `DataConfig`, the settings all of them read.
"""
from .advantages import compute_advantages
from .build import build_train_batch
from .config import DataConfig
from .pack import plan_micro_batches, split_for_ranks
from .ship import (broadcast_groups, groups_from_json_bytes, groups_from_tensor, groups_to_json_bytes,
                   groups_to_tensor)
from .validate import DROP_REASONS, IGNORE, filter_groups, reason_key, validate_group

__all__ = ["DROP_REASONS", "IGNORE", "DataConfig", "broadcast_groups", "build_train_batch", "compute_advantages",
           "filter_groups", "groups_from_json_bytes", "groups_from_tensor", "groups_to_json_bytes",
           "groups_to_tensor", "plan_micro_batches", "reason_key", "split_for_ranks", "validate_group"]
