"""`DataConfig`: how Atropos groups become training tensors (read by every `atropos_core.data` module)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from ..checks import Finite, Ge, check_fields


@dataclass
class DataConfig:
    """How Atropos groups become training tensors."""

    max_token_len: Annotated[int, Ge(2)] = 2048
    """Longest sequence (tokens, prompt included) kept; longer ones drop their group ("too_long").
    In a run: `run.max_token_len`, the same limit the environments are told."""
    vocab_size: Optional[Annotated[int, Ge(1)]] = None
    """Rows of the model's embedding: token ids must be in [0, vocab_size). None checks only >= 0
    (set it: an out-of-range id is an index error deep inside the embedding otherwise)."""
    pad_token_id: Annotated[int, Ge(0)] = 0
    """Token written in padded positions of `input_ids` (never trained, attention_mask 0)."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """GRPO advantage from `scores` when a group sends no token `advantages`: score minus group mean,
    divided by the group std ("group"), the std of all scores in the batch ("batch"), or 1 ("none")."""
    advantage_norm: Literal["none", "batch"] = "none"
    """Whitening of the token advantages over trained tokens: none, or over this batch (every rank
    builds the same full batch, see `broadcast_groups`, so this is the global whitening too)."""
    advantage_clip: Optional[tuple[float, float]] = None
    """[lo, hi] bounds for the final token advantages, or None."""
    advantage_eps: Annotated[float, Ge(0), Finite()] = 1e-6
    """A std at or below this counts as zero: advantages are centred but not divided by it."""
    max_tokens_per_micro_batch: Annotated[int, Ge(1)] = 8192
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
        check_fields(self, "data")
        if self.vocab_size is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"data.pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")
        if self.advantage_clip is not None:
            clip = tuple(self.advantage_clip)
            if len(clip) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip) \
                    or not clip[0] < clip[1]:
                raise ValueError("data.advantage_clip must be [lo, hi] with finite lo < hi, "
                                 f"got {self.advantage_clip!r}")
            self.advantage_clip = (float(clip[0]), float(clip[1]))
