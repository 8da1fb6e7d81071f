"""The tensors that cross module boundaries: what `atropos_core.data` produces and `loss`/`trainer` consume.

Alignment (Atropos convention): in a group, the mask/advantage/logprob entries at position t belong
to token t, which the model predicts from position t-1. A `MicroBatch` is already shifted: row
position t holds input token t and `targets[.., t]` = token t+1, with `loss_mask`, `advantages`,
`old_logprobs` and `ref_logprobs` at t describing that target. Padding and sequence boundaries have
`loss_mask == 0`, so they never reach the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class MicroBatch:
    """One forward/backward pass worth of rows, shape `(R, T)` for every tensor.

    `layout == "padded"`: one sequence per row, right-padded; `attention_mask` is 1 on real tokens.
    `layout == "packed"`: several sequences per row; `position_ids` restart at 0 at each sequence
    start; `cu_seqlens` (int32, flattened over rows) and `max_seqlen` give the boundaries to
    flash-attention's varlen kernel (`atropos_core.loss`). `max_seqlen` is a host int known where
    the micro-batch is built; left 0 beside a CPU `cu_seqlens` it is derived here, once, from
    those host values (never later from a device copy: that would be a host sync per forward).
    """

    input_ids: torch.Tensor                 # (R, T) int64
    targets: torch.Tensor                   # (R, T) int64, token t+1 (0 where nothing follows)
    loss_mask: torch.Tensor                 # (R, T) float32, 1.0 where targets[r, t] is trained
    advantages: torch.Tensor                # (R, T) float32
    attention_mask: torch.Tensor            # (R, T) int64, 1 on real tokens, 0 on padding
    position_ids: torch.Tensor              # (R, T) int64
    old_logprobs: Optional[torch.Tensor] = None   # (R, T) float32, behaviour policy (inference)
    ref_logprobs: Optional[torch.Tensor] = None   # (R, T) float32, reference policy
    layout: str = "padded"
    cu_seqlens: Optional[torch.Tensor] = None     # packed only: (S+1,) int32 over the flattened rows
    max_seqlen: int = 0                            # packed only: longest sequence (host int, for varlen attention)
    num_sequences: int = 0
    sequence_ids: Optional[torch.Tensor] = None   # (R, T) int64: index of the batch's kept sequence
                                                  # (TrainBatch order) at each position, -1 on padding;
                                                  # for per-sequence reductions in either layout
    behaviour_mask: Optional[torch.Tensor] = None  # (R, T) bool, with old_logprobs: True where the
                                                   # position has a behaviour logprob (its group sent them)
    temperature: Optional[torch.Tensor] = None     # (R, T) float32 sampling temperature of each
                                                   # position's sequence; 0 = use loss.temperature
    distill_ids: Optional[torch.Tensor] = None     # (R, T, k) int64 teacher top-k ids for targets[r, t];
                                                   # -1 where the row has no teacher (or is not trained)
    distill_logprobs: Optional[torch.Tensor] = None  # (R, T, k) float32 teacher logprobs at those ids

    def __post_init__(self):
        cu = self.cu_seqlens
        if self.layout == "packed" and not self.max_seqlen and cu is not None and cu.device.type == "cpu" \
                and cu.numel() > 1:
            self.max_seqlen = int(cu.diff().max())

    @property
    def num_trained_tokens(self) -> int:
        return int((self.loss_mask != 0).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


@dataclass
class TrainBatch:
    """One Atropos batch after validation, advantages and packing."""

    micro_batches: list[MicroBatch]
    total_trained_tokens: int               # over the whole batch (every rank builds the same full
                                            # batch, so this is already global) -> loss normaliser
    num_groups: int                         # groups kept
    num_sequences: int
    scores: list[float] = field(default_factory=list)   # per kept sequence, for reward metrics
    metrics: dict = field(default_factory=dict)         # data/* metrics, e.g. data/dropped/<reason>


def empty_micro_batch(like: Optional[MicroBatch] = None, pad_token_id: int = 0) -> MicroBatch:
    """A 1×1 micro-batch that trains nothing, for a rank short of micro-batches: under FSDP every
    rank must run the same number of forwards/backwards (the same collectives); this one adds zero
    gradient. Its one token is attended (attention_mask 1): a row with no attended key gives NaN
    attention, and NaN × 0 is still NaN in the loss. `like`: carry its layout and optional fields
    (`data.split_for_ranks`: a batch's micro-batches share one structure); None: padded, none."""
    def zeros(dt, extra=()):
        return torch.zeros((1, 1) + tuple(extra), dtype=dt)

    def mirror(name, make):
        return make() if like is not None and getattr(like, name) is not None else None

    k = like.distill_ids.shape[2:] if like is not None and like.distill_ids is not None else ()
    packed = like is not None and like.layout == "packed"
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.int64),
        targets=zeros(torch.int64), loss_mask=zeros(torch.float32), advantages=zeros(torch.float32),
        attention_mask=torch.ones((1, 1), dtype=torch.int64), position_ids=zeros(torch.int64),
        old_logprobs=mirror("old_logprobs", lambda: zeros(torch.float32)),
        ref_logprobs=mirror("ref_logprobs", lambda: zeros(torch.float32)),
        behaviour_mask=mirror("behaviour_mask", lambda: zeros(torch.bool)),
        temperature=mirror("temperature", lambda: zeros(torch.float32)),
        distill_ids=mirror("distill_ids", lambda: torch.full((1, 1) + k, -1, dtype=torch.int64)),
        distill_logprobs=mirror("distill_ids", lambda: zeros(torch.float32, k)),
        layout="packed" if packed else "padded",
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32) if packed else None, max_seqlen=1 if packed else 0,
        num_sequences=0, sequence_ids=torch.full((1, 1), -1, dtype=torch.int64))
