"""Old import path of `atropos_core.data` (kept for this round so that other branches merge)."""
from .data import (DROP_REASONS, IGNORE, DataConfig, broadcast_groups, build_train_batch,  # noqa: F401
                   compute_advantages, filter_groups, groups_from_json_bytes, groups_from_tensor,
                   groups_to_json_bytes, groups_to_tensor, plan_micro_batches, reason_key, split_for_ranks,
                   validate_group)
