"""`build_train_batch`: one Atropos batch → `TrainBatch` (validate, advantages, shift, plan, pack).

Every rank runs it on the same raw groups (`ship.broadcast_groups`), so every rank holds the same
full batch: `TrainBatch.total_trained_tokens` is the global loss normaliser, independent of how the
micro-batches are split over ranks, and batch-level statistics are already global.

Optional fields are decided per batch (`BatchFields`): a micro-batch carries behaviour logprobs,
reference logprobs, per-token temperatures or teacher top-k when any sequence of the batch does,
so every micro-batch and rank sees the same structure.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..types import TrainBatch
from .advantages import compute_advantages
from .config import DataConfig
from .pack import BatchFields, make_micro_batch, plan_micro_batches, shift_sequence
from .validate import CheckedSeq, filter_groups

logger = logging.getLogger(__name__)

_logged_behaviour = False


def _batch_fields(seqs: list[CheckedSeq], cfg: DataConfig, log: bool) -> tuple[BatchFields, dict]:
    """The optional fields of this batch and the counters that explain them (see `DataConfig`)."""
    global _logged_behaviour
    with_inf = [s.inference_logprobs is not None for s in seqs]
    old = bool(cfg.use_inference_logprobs) or (cfg.use_inference_logprobs is None and any(with_inf))
    metrics = {}
    if old:
        metrics["data/sequences_without_inference_logprobs"] = sum(not w for w in with_inf)
        if not _logged_behaviour and log:
            logger.info("batches carry inference_logprobs: they are the behaviour policy of the loss "
                        "(data.use_inference_logprobs=%s; see loss.is_mode). Sequences without them are "
                        "trained as on-policy and counted in data/sequences_without_inference_logprobs",
                        {None: "auto", True: "true"}[cfg.use_inference_logprobs])
            _logged_behaviour = True
    ks = [s.distill_ids.shape[1] for s in seqs if s.distill_ids is not None]
    if ks:
        metrics["data/distill_top_k"] = min(ks)
        metrics["data/sequences_without_distill"] = len(seqs) - len(ks)
    fields = BatchFields(old=old, ref=cfg.use_ref_logprobs, temperature=any(s.temperature is not None for s in seqs),
                         distill_k=min(ks) if ks else 0)
    return fields, metrics


def build_train_batch(groups: Sequence, cfg: DataConfig, log_drops: bool = True) -> TrainBatch:
    """Validate, compute advantages and pack one Atropos batch (a list of groups as `/batch` sends).

    Sequences are numbered in the order of the kept groups (`MicroBatch.sequence_ids`,
    `TrainBatch.scores`). With every group dropped, `micro_batches` is empty and
    `total_trained_tokens` 0: skip the step. Pass `log_drops=False` on all ranks but one.
    """
    kept, parsed, metrics = filter_groups(groups, cfg, log_drops)
    seqs = [s for g in parsed for s in g]
    advs = compute_advantages(parsed, cfg)
    fields, field_metrics = _batch_fields(seqs, cfg, log_drops)
    metrics.update(field_metrics)
    rows = [shift_sequence(s, a, k, fields) for k, (s, a) in enumerate(zip(seqs, advs))]
    plan = plan_micro_batches([len(r.input_ids) for r in rows], cfg.max_tokens_per_micro_batch,
                              padded=cfg.layout == "padded")
    mbs = [make_micro_batch([rows[i] for i in idx], cfg, fields) for idx in plan]
    trained = int(sum(r.loss_mask.sum() for r in rows))
    real = sum(len(r.input_ids) for r in rows)
    slots = sum(mb.input_ids.numel() for mb in mbs)
    all_adv = np.concatenate([r.advantages[r.loss_mask > 0] for r in rows]) if rows else np.zeros(0)
    metrics.update({
        "data/groups": len(kept),
        "data/sequences": len(seqs),
        "data/tokens": real,
        "data/trained_tokens": trained,
        "data/micro_batches": len(mbs),
        "data/padding_fraction": (1.0 - real / slots) if slots else 0.0,
        "data/seq_len_mean": (real / len(rows)) if rows else 0.0,
        "data/advantage_mean": float(all_adv.mean()) if all_adv.size else 0.0,
        "data/advantage_abs_mean": float(np.abs(all_adv).mean()) if all_adv.size else 0.0,
    })
    return TrainBatch(micro_batches=mbs, total_trained_tokens=trained, num_groups=len(kept),
                      num_sequences=len(seqs), scores=[s.score for s in seqs], metrics=metrics)

