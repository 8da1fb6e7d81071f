"""One optimizer step: gradient accumulation over micro-batches, clipping, non-finite guard, metrics.

Design:
- Every micro-batch loss is divided by the GLOBAL trained-token count (summed over all ranks and
  micro-batches by the caller), and FSDP2 sums gradients over ranks (`model.apply_fsdp`), so the
  update is the gradient of the global token mean whatever the split (tests/test_trainer.py runs
  one batch as 1 process and as 2 FSDP ranks and compares the updated weights).
- Under FSDP every backward is a collective, so all ranks must run the same number of
  micro-batches: a rank with fewer runs empty ones (loss mask 0: zero gradient, same collectives).
- Statistics are accumulated as 0-dim tensors and reduced in ONE all-reduce at the end: no
  `.item()` in the micro-batch loop. The only host syncs per step are that reduction and the
  finite check that decides whether the optimizer steps.
- A step whose global loss or gradient norm is not finite is skipped on every rank alike
  (both values are global): gradients are dropped, optimizer and scheduler are untouched, and
  `train/skipped_nonfinite` is 1 for that step.
"""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Sequence

import torch
from torch import nn

from . import dist as adist
from .loss import LossConfig, micro_batch_loss
from .types import MicroBatch, empty_micro_batch

logger = logging.getLogger(__name__)

__all__ = ["train_step", "global_token_count", "peak_memory_gb", "empty_micro_batch"]

_STAT_KEYS = ("tokens", "entropy_sum", "clip_sum", "logprob_sum", "kl_sum", "logprob_diff_sum",
              "mismatch_k3_sum", "behaviour_tokens", "is_weight_sum", "is_truncated_tokens", "is_masked_tokens",
              "is_sequences", "is_flagged_sequences", "distill_kl_sum", "distill_top1_sum", "distill_tokens")


def global_token_count(micro_batches: Sequence[MicroBatch]) -> float:
    """Trained tokens of this rank's micro-batches summed over all ranks: the `global_normalizer`
    of `train_step` (a collective under a process group; every rank must call it)."""
    return float(adist.all_reduce_sum(sum(mb.num_trained_tokens for mb in micro_batches)))


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak process RSS (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _grad_norm(params: list, grad_clip: float) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: Sequence[MicroBatch],
               loss_cfg: LossConfig, *, global_normalizer: float, grad_clip: float) -> dict:
    """Forward/backward every micro-batch, clip, and step (unless non-finite).

    Args:
        micro_batches: this rank's micro-batches (moved to the model's device here).
        global_normalizer: trained tokens summed over ALL micro-batches of ALL ranks (> 0).
        grad_clip: max global gradient norm; 0 disables clipping (the norm is still computed).
    Returns:
        metrics (floats, global over ranks): `loss/total`, `entropy/mean`, `clip/frac`,
        `logprob/mean`, `grad/norm`, `lr` (the rate used by this step), `train/tokens` (trained),
        `train/tokens_total` (non-padding input tokens), `train/micro_batches`,
        `train/skipped_nonfinite` (0 or 1), `perf/train_step_s`, `perf/train_tokens_per_s`,
        `perf/mem_gb`, and `kl/mean` / `logprob/abs_diff_inference` when the batch carries
        reference / inference logprobs; then also `offpolicy/mismatch_kl` (k3 estimate of
        KL(behaviour ‖ current) per behaviour token), `offpolicy/behaviour_frac`, and with an
        `is_mode`: `offpolicy/is_weight_mean`, `offpolicy/is_weight_max`, `offpolicy/truncated_frac`,
        `offpolicy/masked_frac` (of trained tokens), `offpolicy/seq_flagged_frac` (sequences with a
        truncated or masked token); with a teacher: `distill/kl`, `distill/top1_agree`.
    """
    if not (global_normalizer > 0 and math.isfinite(global_normalizer)):
        raise ValueError(f"global_normalizer must be a positive finite number, got {global_normalizer}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0, got {grad_clip}")
    t0 = time.perf_counter()
    device = adist.model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)

    n_local = len(micro_batches)
    n_max = adist.all_reduce_max(n_local)
    if n_max == 0:
        raise ValueError("train_step: no micro-batches on any rank")
    mbs = list(micro_batches) + [empty_micro_batch() for _ in range(n_max - n_local)]

    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = {k: zero.clone() for k in _STAT_KEYS}
    loss_sum, tok_total = zero.clone(), zero.clone()
    has_ref = has_old = has_is = has_distill = False
    w_max = zero.clone()
    for mb in mbs:
        n_sel = mb.num_trained_tokens if mb.loss_mask.device.type == "cpu" else None  # counted on the host
        mb = mb.to(device)
        loss, st = micro_batch_loss(model, mb, loss_cfg, global_normalizer, num_selected=n_sel)
        loss.backward()
        loss_sum += loss.detach().double()
        tok_total += mb.attention_mask.sum().double()
        has_ref |= "kl_sum" in st
        has_old |= "logprob_diff_sum" in st
        has_is |= "is_weight_sum" in st
        has_distill |= "distill_tokens" in st
        if "is_weight_max" in st:
            w_max = torch.maximum(w_max, st.pop("is_weight_max").double())
        for k, v in st.items():
            sums[k] += v.double()

    grad_norm_v = float(_grad_norm(params, grad_clip))  # already global over ranks
    flags = torch.tensor([float(has_ref), float(has_old), float(has_is), float(has_distill)], dtype=torch.float64,
                         device=device)
    packed = torch.cat([torch.stack([loss_sum, tok_total] + [sums[k] for k in _STAT_KEYS]), flags])
    vals = adist.all_reduce_sum(packed).tolist()  # one collective, one host sync
    loss_total, tokens_total = vals[0], vals[1]
    s = dict(zip(_STAT_KEYS, vals[2:2 + len(_STAT_KEYS)]))
    any_ref, any_old, any_is, any_distill = (v > 0 for v in vals[-4:])
    if any_is:
        w_max_v = float(adist.all_reduce_max(w_max))

    lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss_total) and math.isfinite(grad_norm_v)
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    else:
        logger.warning("train_step: non-finite loss %s or grad norm %s: step skipped, weights untouched",
                       loss_total, grad_norm_v)
    optimizer.zero_grad(set_to_none=True)

    dt = time.perf_counter() - t0
    n_tok = max(s["tokens"], 1.0)
    metrics = {
        "loss/total": loss_total,
        "entropy/mean": s["entropy_sum"] / n_tok,
        "clip/frac": s["clip_sum"] / n_tok,
        "logprob/mean": s["logprob_sum"] / n_tok,
        "grad/norm": grad_norm_v,
        "lr": lr,
        "train/tokens": s["tokens"],
        "train/tokens_total": tokens_total,
        "train/micro_batches": float(n_max),
        "train/skipped_nonfinite": 0.0 if finite else 1.0,
        "perf/train_step_s": dt,
        "perf/train_tokens_per_s": tokens_total / dt if dt > 0 else 0.0,
        "perf/mem_gb": peak_memory_gb(device),
    }
    if any_ref:
        metrics["kl/mean"] = s["kl_sum"] / n_tok
    if any_old:
        n_b = max(s["behaviour_tokens"], 1.0)
        metrics["logprob/abs_diff_inference"] = s["logprob_diff_sum"] / n_b
        metrics["offpolicy/mismatch_kl"] = s["mismatch_k3_sum"] / n_b
        metrics["offpolicy/behaviour_frac"] = s["behaviour_tokens"] / n_tok
    if any_is:
        metrics["offpolicy/is_weight_mean"] = s["is_weight_sum"] / n_tok
        metrics["offpolicy/is_weight_max"] = w_max_v
        metrics["offpolicy/truncated_frac"] = s["is_truncated_tokens"] / n_tok
        metrics["offpolicy/masked_frac"] = s["is_masked_tokens"] / n_tok
        metrics["offpolicy/seq_flagged_frac"] = s["is_flagged_sequences"] / max(s["is_sequences"], 1.0)
    if any_distill:
        n_d = max(s["distill_tokens"], 1.0)
        metrics["distill/kl"] = s["distill_kl_sum"] / n_d
        metrics["distill/top1_agree"] = s["distill_top1_sum"] / n_d
    return metrics
