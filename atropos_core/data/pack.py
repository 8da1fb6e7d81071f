"""Packing: shifted rows → micro-batches (`atropos_core.types.MicroBatch`), and their split over ranks.

Alignment: Atropos puts `masks`, `advantages`, `inference_logprobs` and `ref_logprobs` at position t
for token t (prompt positions: mask -100, inference logprob 1.0). The model predicts token t from
position t-1, so a sequence of L tokens becomes L-1 row positions: `input_ids = tokens[:-1]`,
`targets = tokens[1:]`, and every per-token field is taken at t+1 (`shift_sequence`, see `types.py`).

Plan: a micro-batch's cost is rows × longest row when padded, the sum of lengths when packed, and
must fit `max_tokens_per_micro_batch` (a longer sequence gets a micro-batch of its own). Sequences
go longest first onto the least loaded of k micro-batches they fit in (LPT), for the smallest k that
works up to what first-fit-decreasing needs; if none does, first-fit-decreasing's grouping is kept
(it puts rows of similar length together: less padding). So micro-batches come out few and with
similar token counts.

Packed layout: one row per micro-batch, `position_ids` restarting at 0 per sequence, and
`cu_seqlens`/`max_seqlen` (the boundaries flash-attention's varlen kernel takes; `atropos_core.loss`
hands them to the model under flash_attention_2, which otherwise re-derives them from the position
ids in every layer; sdpa/eager build their block-diagonal mask from the position ids).

`split_for_ranks` gives every rank the same number of micro-batches (FSDP issues the same
collectives per forward/backward on every rank), padding with an all-masked one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..types import MicroBatch, empty_micro_batch
from .config import DataConfig
from .validate import CheckedSeq


def _cost(rows: int, longest: int, total: int, padded: bool) -> int:
    return rows * longest if padded else total


def _first_fit(order: list[int], lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """First-fit in `order` (longest first, so a bin's first sequence is its longest)."""
    bins: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        for b, members in enumerate(bins):
            if _cost(len(members) + 1, lengths[members[0]], totals[b] + lengths[i], padded) <= budget:
                members.append(i)
                totals[b] += lengths[i]
                break
        else:
            bins.append([i])
            totals.append(lengths[i])
    return bins


def _balanced(order: list[int], lengths: Sequence[int], budget: int, padded: bool, k: int) -> Optional[list[list[int]]]:
    """Longest first onto the least loaded of `k` micro-batches it fits in; None if one fits nowhere.
    Vectorised over the k micro-batches (a 1k-sequence batch plans in milliseconds)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    rows = np.zeros(k, dtype=np.int64)
    longest = np.zeros(k, dtype=np.int64)
    totals = np.zeros(k, dtype=np.int64)
    loads = np.zeros(k, dtype=np.int64)
    for i in order:
        n = lengths[i]
        new_cost = (rows + 1) * np.maximum(longest, n) if padded else totals + n
        fits = new_cost <= budget
        if not fits.any():
            return None
        b = int(np.argmin(np.where(fits, loads, np.iinfo(np.int64).max)))  # first of the least loaded
        bins[b].append(i)
        rows[b] += 1
        longest[b] = max(longest[b], n)
        totals[b] += n
        loads[b] = new_cost[b]
    return [b for b in bins if b]


def plan_micro_batches(lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """Indices of the sequences in each micro-batch (sorted within it): a sequence longer than
    `budget` alone; the rest in as few micro-batches as first-fit-decreasing needs, spread evenly
    by cost (longest-processing-time first onto the least loaded micro-batch) when that many
    balanced micro-batches suffice, else first-fit-decreasing's own grouping (which keeps rows of
    similar length together: less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    alone = [[i] for i in order if lengths[i] > budget]
    rest = [i for i in order if lengths[i] <= budget]
    if not rest:
        return alone
    packed_ffd = _first_fit(rest, lengths, budget, padded)
    for k in range(max(1, math.ceil(sum(lengths[i] for i in rest) / budget)), len(packed_ffd) + 1):
        bins = _balanced(rest, lengths, budget, padded, k)
        if bins is not None:
            return alone + [sorted(b) for b in bins]
    return alone + [sorted(b) for b in packed_ffd]


@dataclass
class _Row:
    """One sequence shifted for training: position t predicts targets[t] = tokens[t+1]."""

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    old_logprobs: Optional[np.ndarray]
    ref_logprobs: Optional[np.ndarray]
    seq_id: int
    temperature: float = 0.0                     # 0 = loss.temperature
    distill_ids: Optional[np.ndarray] = None     # (L-1, k)
    distill_logprobs: Optional[np.ndarray] = None


@dataclass
class BatchFields:
    """Which optional tensors the micro-batches of one batch carry (the same for all of them, so
    every rank and micro-batch sees the same structure)."""

    old: bool = False
    ref: bool = False
    temperature: bool = False
    distill_k: int = 0


def shift_sequence(s: CheckedSeq, adv: np.ndarray, seq_id: int, fields: BatchFields) -> _Row:
    m = s.trained[1:]
    lp = lambda a: np.where(m, a[1:], 0.0) if a is not None else None  # noqa: E731 - prompt 1.0s go
    d_ids = d_lps = None
    if fields.distill_k:
        k = fields.distill_k
        d_ids = np.full((len(m), k), -1, dtype=np.int64)   # -1: no teacher for this row
        d_lps = np.zeros((len(m), k), dtype=np.float64)
        if s.distill_ids is not None:
            # sorted by the teacher's logprob, then cut to the batch's smallest k: the top-k' of a
            # top-k is the top-k' (vLLM also appends the sampled token after the top-k)
            order = np.argsort(-s.distill_logprobs[1:], axis=1, kind="stable")[:, :k]
            d_ids = np.where(m[:, None], np.take_along_axis(s.distill_ids[1:], order, 1), -1)
            d_lps = np.where(m[:, None], np.take_along_axis(s.distill_logprobs[1:], order, 1), 0.0)
    return _Row(input_ids=s.tokens[:-1], targets=s.tokens[1:], loss_mask=m.astype(np.float32),
                advantages=np.where(m, adv[1:], 0.0),
                old_logprobs=lp(s.inference_logprobs) if fields.old else None,
                ref_logprobs=lp(s.ref_logprobs) if fields.ref else None, seq_id=seq_id,
                temperature=s.temperature or 0.0, distill_ids=d_ids, distill_logprobs=d_lps)


def make_micro_batch(rows: list[_Row], cfg: DataConfig, fields: BatchFields) -> MicroBatch:
    with_old, with_ref = fields.old, fields.ref
    lengths = [len(r.input_ids) for r in rows]
    cu = None
    if cfg.layout == "packed":
        ends = np.cumsum(lengths).tolist()       # the one sum: row offsets and cu_seqlens
        shape = (1, ends[-1])
        placements = [(r, 0, end - n) for r, n, end in zip(rows, lengths, ends)]
        cu = torch.tensor([0] + ends, dtype=torch.int32)
    else:
        shape = (len(rows), max(lengths))
        placements = [(r, k, 0) for k, r in enumerate(rows)]
    input_ids = torch.full(shape, cfg.pad_token_id, dtype=torch.int64)
    targets = torch.zeros(shape, dtype=torch.int64)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    advantages = torch.zeros(shape, dtype=torch.float32)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    sequence_ids = torch.full(shape, -1, dtype=torch.int64)
    old = torch.zeros(shape, dtype=torch.float32) if with_old else None
    bmask = torch.zeros(shape, dtype=torch.bool) if with_old else None
    ref = torch.zeros(shape, dtype=torch.float32) if with_ref else None
    temp = torch.zeros(shape, dtype=torch.float32) if fields.temperature else None
    k = fields.distill_k
    d_ids = torch.full(shape + (k,), -1, dtype=torch.int64) if k else None
    d_lps = torch.zeros(shape + (k,), dtype=torch.float32) if k else None
    for r, row, off in placements:
        n = len(r.input_ids)
        sl = (row, slice(off, off + n))
        input_ids[sl] = torch.from_numpy(r.input_ids)
        targets[sl] = torch.from_numpy(r.targets)
        loss_mask[sl] = torch.from_numpy(r.loss_mask)
        advantages[sl] = torch.from_numpy(r.advantages).to(torch.float32)
        attention_mask[sl] = 1
        position_ids[sl] = torch.arange(n)
        sequence_ids[sl] = r.seq_id
        if with_old and r.old_logprobs is not None:
            old[sl] = torch.from_numpy(r.old_logprobs).to(torch.float32)
            bmask[sl] = True
        if with_ref:
            ref[sl] = torch.from_numpy(r.ref_logprobs).to(torch.float32)
        if temp is not None:
            temp[sl] = r.temperature
        if k:
            d_ids[sl] = torch.from_numpy(r.distill_ids)
            d_lps[sl] = torch.from_numpy(r.distill_logprobs).to(torch.float32)
    return MicroBatch(input_ids=input_ids, targets=targets, loss_mask=loss_mask, advantages=advantages,
                      attention_mask=attention_mask, position_ids=position_ids, old_logprobs=old,
                      ref_logprobs=ref, layout=cfg.layout, cu_seqlens=cu,
                      max_seqlen=max(lengths) if cu is not None else 0, num_sequences=len(rows),
                      sequence_ids=sequence_ids, behaviour_mask=bmask, temperature=temp,
                      distill_ids=d_ids, distill_logprobs=d_lps)


def split_for_ranks(micro_batches: Sequence[MicroBatch], world_size: int,
                    pad_token_id: int = 0) -> list[list[MicroBatch]]:
    """Share micro-batches between ranks, balanced by token slots (rows × length), with the SAME
    number per rank: FSDP runs the same collectives per forward/backward on every rank, so a rank
    with one micro-batch fewer would hang the others. Short ranks get an all-masked 1×1 micro-batch
    (it must still go through forward and backward). Deterministic: every rank computes the same
    split and takes `result[rank]`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not micro_batches:
        raise ValueError("split_for_ranks needs at least one micro-batch (an empty batch is a skipped step)")
    per_rank = math.ceil(len(micro_batches) / world_size)
    order = sorted(range(len(micro_batches)), key=lambda i: (-micro_batches[i].input_ids.numel(), i))
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in order:
        r = min((r for r in range(world_size) if len(shares[r]) < per_rank), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += micro_batches[i].input_ids.numel()
    out = []
    for share in shares:
        mbs = [micro_batches[i] for i in sorted(share)]
        mbs += [empty_micro_batch(micro_batches[0], pad_token_id) for _ in range(per_rank - len(mbs))]
        out.append(mbs)
    return out

