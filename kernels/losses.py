"""Per-token policy-loss heads on `(N,)` vectors: value and derivative with respect to logp.

Every token-level loss we train with is *token-local*: token i's loss depends only on its own
logprob `logp_i` (and on per-token constants: advantage, old, behaviour and reference logprob, the
teacher's top-k). So the derivative `g_i = dL/dlogp_i` is known as soon as `logp_i` is, and the
fused kernels fold it straight into `dZ = g_i * (onehot(t_i) - softmax(z_i)) / T` in the forward
pass (6·N·D·V FLOPs instead of 8). This module is the only place the loss formulas live for the
fast backends; the reference (`kernels/reference.py`) writes the same definitions with plain
autograd, so tests check the derivatives here against autograd.

Definitions (m = mask, A = advantage, r = exp(logp - old), the caller divides by Z):
  awsft : l = -A·logp                                  g = -A
  grpo  : l = max(-r·A, -clip(r, 1-εl, 1+εh)·A)         g = -r·A where the unclipped branch is
                                                            active (or r lies inside the clip
                                                            range), else 0
  cispo : l = -sg(min(r, 1+εh))·A·logp                 g = -min(r, 1+εh)·A
  distill: no policy term (distillation only)
  kl    : + β·(exp(d) - d - 1), d = ref - logp         g += β·(1 - exp(d))
  IS    : the policy term (not the KL) times a detached weight w (`is_weights`, `seq_is_weights`)

GSPO is *not* token-local (its ratio is a per-sequence mean): `gspo_coefficients` takes the logprobs
of a first pass and returns the per-token derivative that the second pass folds into dZ.

The distillation term is token-local but touches k logits per row besides the target:
`distill_loss_and_grad` returns its value and its derivative with respect to the k tempered logits
x_K (and a multiple of softmax(x) for "ce"), which the chunk loop adds into dZ (no extra GEMM).

The settings (loss type, clip range, β, IS mode and bounds) come from a `kernels.spec.LossSpec`,
checked once when it is built; the mode and type tuples live there and are re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import DISTILL_MODES, IS_MODES, LOSS_TYPES, SEQ_IS_MODES, LossSpec

__all__ = ["LOSS_TYPES", "IS_MODES", "SEQ_IS_MODES", "DISTILL_MODES", "is_weights", "seq_is_weights",
           "token_loss_and_grad", "segment_ids", "segment_sum", "gspo_coefficients", "distill_loss_and_grad"]

_EXP_MAX = 20.0  # log-ratios are clamped here only to keep exp() finite


def _truncate(r: torch.Tensor, cap: float):
    """`(w, truncated, masked)` of a truncated weight: w = min(r, cap)."""
    return r.clamp(max=cap), r > cap, torch.zeros_like(r, dtype=torch.bool)


def _band(r: torch.Tensor, low: float, high: float):
    """`(w, truncated, masked)` of a band mask: w = 1[low <= r <= high]."""
    keep = (r >= low) & (r <= high)
    return keep.to(r.dtype), torch.zeros_like(r, dtype=torch.bool), ~keep


def is_weights(log_ratio: torch.Tensor, spec: LossSpec):
    """Token-level correction `(w, truncated, masked)` from `log_ratio = sg(logp) - behaviour` `(n,)`.
    token_tis: w = min(e^δ, is_cap); token_mask: w = 1[is_low <= e^δ <= is_high]. `w` is detached."""
    r = torch.exp(log_ratio.detach().clamp(max=_EXP_MAX))
    if spec.is_mode == "token_tis":
        return _truncate(r, spec.is_cap)
    if spec.is_mode == "token_mask":
        return _band(r, spec.is_low, spec.is_high)
    raise ValueError(f"is_weights handles token modes, got {spec.is_mode!r}")


def seq_is_weights(log_ratio_sum: torch.Tensor, n_tokens: torch.Tensor, spec: LossSpec):
    """Sequence-level correction `(w, truncated, masked)` per sequence from S_i = Σ_t δ_t and n_i."""
    if spec.is_mode == "geo_mask":
        g = torch.exp((log_ratio_sum / n_tokens.clamp(min=1)).clamp(max=_EXP_MAX))
        return _band(g, spec.geo_low, spec.geo_high)
    R = torch.exp(log_ratio_sum.clamp(max=_EXP_MAX))
    if spec.is_mode == "seq_tis":
        return _truncate(R, spec.is_cap)
    if spec.is_mode == "seq_mask":
        return _band(R, spec.is_low, spec.is_high)
    raise ValueError(f"seq_is_weights handles sequence modes, got {spec.is_mode!r}")


def token_loss_and_grad(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    is_weight: Optional[torch.Tensor] = None,
    policy: bool = True,
):
    """Masked per-token loss terms and their derivative with respect to `logp`.

    Args:
        logp: `(n,)` float32/float64 logprobs of the target tokens (no grad needed).
        advantages, mask: `(n,)`; mask is 0/1 (or a weight).
        spec: `loss_type`, `clip_low`, `clip_high` and `kl_coef` are read from it.
        old_logprobs: `(n,)` PPO old-policy logprobs; None means `old = logp` (ratio 1).
        ref_logprobs: `(n,)` reference-policy logprobs for the KL term.
        is_weight: `(n,)` detached importance weight of the policy term (None = 1).
        policy: False leaves out the policy term (only the KL term: GSPO's policy term is
            sequence-level, see `gspo_coefficients`).
    Returns:
        `(loss_sum, dlogp, clipped)`: the unnormalised masked sum (0-dim), `(n,)` derivative of
        that sum with respect to logp, and an `(n,)` bool tensor of tokens whose update was clipped.
    """
    dt = logp.dtype
    adv = advantages.to(dt)
    m = mask.to(dt)
    clipped = torch.zeros_like(logp, dtype=torch.bool)
    loss_type, clip_low, clip_high, kl_coef = spec.loss_type, spec.clip_low, spec.clip_high, spec.kl_coef
    if loss_type == "distill" or not policy:
        per_tok = torch.zeros_like(logp)
        g = torch.zeros_like(logp)
    elif loss_type == "awsft":
        per_tok = -adv * logp
        g = -adv
    else:
        old = logp if old_logprobs is None else old_logprobs.to(dt)
        # Clamp the log-ratio only to keep exp() finite: a ratio of e^20 is already far outside
        # any clip range, so the clamped value changes no selected branch.
        ratio = torch.exp((logp - old).clamp(-_EXP_MAX, _EXP_MAX))
        if loss_type == "grpo":
            clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
            unclipped_term = -ratio * adv
            clipped_term = -clipped_ratio * adv
            per_tok = torch.maximum(unclipped_term, clipped_term)
            # The clipped branch wins with zero slope when the ratio left the range in the
            # direction the advantage pushes it.
            clipped = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
            g = torch.where(clipped, torch.zeros_like(ratio), -ratio * adv)
        elif loss_type == "cispo":
            w = torch.clamp(ratio, max=1.0 + clip_high)
            per_tok = -w * adv * logp
            g = -w * adv
            clipped = ratio > 1.0 + clip_high
        else:
            raise ValueError(f"token_loss_and_grad: {loss_type!r} is not token-local (see gspo_coefficients)")
    if is_weight is not None:
        w_is = is_weight.to(dt)
        per_tok = per_tok * w_is
        g = g * w_is
    if kl_coef > 0.0 and ref_logprobs is not None:
        d = (ref_logprobs.to(dt) - logp).clamp(max=_EXP_MAX)
        ed = torch.exp(d)
        per_tok = per_tok + kl_coef * (ed - d - 1.0)
        g = g + kl_coef * (1.0 - ed)
    clipped = clipped & (m > 0)
    return (per_tok * m).sum(), g * m, clipped


def segment_ids(sequence_ids: torch.Tensor):
    """`(segment (n,), n_slots)`: consecutive numbers 0, 1, ... for the runs of equal sequence ids.
    Every sequence's tokens are contiguous (one micro-batch row, or one packed span), so a run is a
    sequence; no host sync: `n_slots = n` bounds the count, unused slots stay empty."""
    n = sequence_ids.numel()
    change = torch.ones(n, dtype=torch.long, device=sequence_ids.device)
    if n > 1:
        change[1:] = (sequence_ids[1:] != sequence_ids[:-1]).long()
    return torch.cumsum(change, 0) - 1, max(n, 1)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    return torch.zeros(n_seg, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def gspo_coefficients(logp, old_logprobs, advantages, mask, seg, n_seg, spec: LossSpec, *,
                      is_weight: Optional[torch.Tensor] = None):
    """GSPO on the selected tokens of whole sequences (first-pass logprobs in, no grad).

    s_i = exp(mean_{t∈i}(logp_t - old_t)), A_i = mean_{t∈i} A_t, ℓ_i = max(-s_i·A_i, -clip(s_i)·A_i).
    Loss sum = Σ_t m_t·w_t·ℓ_{i(t)} = Σ_i M_i·ℓ_i with M_i = Σ_{t∈i} m_t·w_t, so
    dL/dlogp_t = M_i·ℓ_i'(s_i)·s_i/n_i for every token of i (ℓ' = -A_i unclipped, 0 clipped).
    Returns `(loss_sum, g (n,), clipped (n,) bool, s per token (n,))`.
    """
    dt = logp.dtype
    clip_low, clip_high = spec.clip_low, spec.clip_high
    old = logp if old_logprobs is None else old_logprobs.to(dt)
    ones = torch.ones_like(logp)
    n_i = segment_sum(ones, seg, n_seg).clamp(min=1)      # empty slots: 0 tokens, no NaN
    s = torch.exp((segment_sum(logp - old, seg, n_seg) / n_i).clamp(-_EXP_MAX, _EXP_MAX))
    A_i = segment_sum(advantages.to(dt), seg, n_seg) / n_i
    ell = torch.maximum(-s * A_i, -s.clamp(1.0 - clip_low, 1.0 + clip_high) * A_i)
    cl = ((s > 1.0 + clip_high) & (A_i > 0)) | ((s < 1.0 - clip_low) & (A_i < 0))
    mw = mask.to(dt) * (is_weight.to(dt) if is_weight is not None else 1.0)
    M = segment_sum(mw, seg, n_seg)
    d_ell = torch.where(cl, torch.zeros_like(s), -A_i)
    g = (M * d_ell * s / n_i)[seg]
    return (M * ell).sum(), g, cl[seg], s[seg]


def distill_loss_and_grad(logp_k: torch.Tensor, teacher_logprobs: torch.Tensor, mode: str = "kl"):
    """Distillation term over the teacher's top-k ids for a chunk of rows.

    Args:
        logp_k: `(c, k)` student log-softmax at the teacher's ids (full-vocabulary normalised).
        teacher_logprobs: `(c, k)` the teacher's logprobs at those ids.
    Returns:
        `(term (c,), d_xk (c, k), d_p (c,), kl (c,), top1_in_k (c,) long)`: the per-row term, its
        derivative with respect to the k tempered logits besides a `d_p · softmax(x)` part over the
        whole row ("ce": d_p = Σq = 1; "kl": 0), the KL(q‖s_K) for the metric, and the argmax of the
        student's logits among the k ids (the caller compares it with the teacher's argmax and with
        the student's own global argmax).
    q = softmax(teacher) over the k ids; s = softmax(logp_k).
    kl: D = Σ q (log q - log s)   dD/dx_K = s - q
    ce: D = -Σ q log p            dD/dx = -q on K + Σq·p (p over the whole row)
    """
    q = torch.softmax(teacher_logprobs.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logprobs.float(), dim=-1)
    log_s = torch.log_softmax(logp_k, dim=-1)
    kl = (q * (log_q - log_s)).sum(-1)
    if mode == "kl":
        term = kl
        d_xk = log_s.exp() - q
        d_p = torch.zeros_like(term)
    elif mode == "ce":
        term = -(q * logp_k).sum(-1)
        d_xk = -q
        d_p = q.sum(-1)
    else:
        raise ValueError(f"distill mode must be one of {DISTILL_MODES}, got {mode!r}")
    return term, d_xk, d_p, kl
