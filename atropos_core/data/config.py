"""`DataConfig`: how Atropos groups become training tensors (read by every `atropos_core.data` module)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class DataConfig:
    """How Atropos groups become training tensors."""

    max_token_len: int = 2048
    """Longest sequence (tokens, prompt included) kept; longer ones drop their group ("too_long").
    Keep it equal to `atropos.max_token_len`, which tells the environments the same limit."""
    vocab_size: Optional[int] = None
    """Rows of the model's embedding: token ids must be in [0, vocab_size). None checks only >= 0
    (set it: an out-of-range id is an index error deep inside the embedding otherwise)."""
    pad_token_id: int = 0
    """Token written in padded positions of `input_ids` (never trained, attention_mask 0)."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """GRPO advantage from `scores` when a group sends no token `advantages`: score minus group mean,
    divided by the group std ("group"), the std of all scores in the batch ("batch"), or 1 ("none")."""
    advantage_norm: Literal["none", "batch"] = "none"
    """Whitening of the token advantages over trained tokens: none, or over this batch (every rank
    builds the same full batch, see `broadcast_groups`, so this is the global whitening too)."""
    advantage_clip: Optional[tuple[float, float]] = None
    """[lo, hi] bounds for the final token advantages, or None."""
    advantage_eps: float = 1e-6
    """A std at or below this counts as zero: advantages are centred but not divided by it."""
    max_tokens_per_micro_batch: int = 8192
    """Budget of one micro-batch in tokens: rows × longest row when padded, total when packed."""
    layout: Literal["padded", "packed"] = "padded"
    """"padded": one sequence per row. "packed": all sequences of a micro-batch in one row with
    position_ids restarting per sequence and cu_seqlens. Attention must honour the boundaries:
    flash-attention varlen does; with transformers 5, SDPA given position_ids and no
    attention_mask builds the block-diagonal causal mask from the position resets
    (tests/test_loss.py::test_packed_row_equals_separate_rows)."""
    use_inference_logprobs: Optional[bool] = None
    """The sampler's `inference_logprobs` as the behaviour policy (`MicroBatch.old_logprobs`, used
    by `loss.is_mode`). None (default, "auto"): used whenever a group carries them; a group
    without them in such a batch is trained as on-policy (its `behaviour_mask` is 0: IS weight 1,
    PPO ratio 1, left out of the mismatch metrics) and counted in
    `data/groups_without_inference_logprobs`. True: required, groups without them are dropped
    ("missing_logprobs"). False: ignored."""
    use_ref_logprobs: bool = False
    """Put the environment's `ref_logprobs` into `MicroBatch.ref_logprobs` (KL penalty); groups
    without them are dropped ("missing_logprobs")."""

    def __post_init__(self):
        if self.max_token_len < 2:
            raise ValueError(f"data.max_token_len must be >= 2 (one context and one target token), "
                             f"got {self.max_token_len}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"data.vocab_size must be >= 1 or None, got {self.vocab_size}")
        if self.pad_token_id < 0 or (self.vocab_size is not None and self.pad_token_id >= self.vocab_size):
            raise ValueError(f"data.pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"data.advantage_scale must be group, batch or none, got {self.advantage_scale!r}")
        if self.advantage_norm not in ("none", "batch"):
            raise ValueError(f"data.advantage_norm must be none or batch, got {self.advantage_norm!r}")
        if self.advantage_clip is not None:
            clip = tuple(self.advantage_clip)
            if len(clip) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip) \
                    or not clip[0] < clip[1]:
                raise ValueError("data.advantage_clip must be [lo, hi] with finite lo < hi, "
                                 f"got {self.advantage_clip!r}")
            self.advantage_clip = (float(clip[0]), float(clip[1]))
        if not (self.advantage_eps >= 0 and math.isfinite(self.advantage_eps)):
            raise ValueError(f"data.advantage_eps must be finite and >= 0, got {self.advantage_eps}")
        if self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"data.max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.layout not in ("padded", "packed"):
            raise ValueError(f"data.layout must be padded or packed, got {self.layout!r}")

