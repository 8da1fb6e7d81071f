"""Per-token policy-loss heads on `(N,)` vectors: value and derivative with respect to logp.

Every loss we train with is *token-local*: token i's loss depends only on its own logprob
`logp_i` (and on per-token constants: advantage, old and reference logprob). So the derivative
`g_i = dL/dlogp_i` is known as soon as `logp_i` is, and the fused kernels fold it straight into
`dZ = g_i * (onehot(t_i) - softmax(z_i)) / T` in the forward pass (6·N·D·V FLOPs instead of 8).
This module is the only place the loss formulas live for the fast backends; the reference
(`kernels/reference.py`) writes the same definitions with plain autograd, so tests check the
derivatives here against autograd.

Definitions (m = mask, A = advantage, r = exp(logp - old), the caller divides by Z):
  awsft : l = -A·logp                                  g = -A
  grpo  : l = max(-r·A, -clip(r, 1-εl, 1+εh)·A)         g = -r·A where the unclipped branch is
                                                            active (or r lies inside the clip
                                                            range), else 0
  cispo : l = -sg(min(r, 1+εh))·A·logp                 g = -min(r, 1+εh)·A
  kl    : + β·(exp(d) - d - 1), d = ref - logp         g += β·(1 - exp(d))
"""
from __future__ import annotations

from typing import Optional

import torch

LOSS_TYPES = ("awsft", "grpo", "cispo")


def check_loss_args(loss_type: str, clip_low: float, clip_high: float, kl_coef: float, temperature: float) -> None:
    """Raise ValueError for a loss configuration that cannot be computed."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (0.0 <= clip_low < 1.0):
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if not kl_coef >= 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_loss_and_grad(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    loss_type: str = "awsft",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
):
    """Masked per-token loss terms and their derivative with respect to `logp`.

    Args:
        logp: `(n,)` float32/float64 logprobs of the target tokens (no grad needed).
        advantages, mask: `(n,)`; mask is 0/1 (or a weight).
        old_logprobs: `(n,)` behaviour-policy logprobs; None means `old = logp` (ratio 1).
        ref_logprobs: `(n,)` reference-policy logprobs for the KL term.
    Returns:
        `(loss_sum, dlogp, clipped)`: the unnormalised masked sum (0-dim), `(n,)` derivative of
        that sum with respect to logp, and an `(n,)` bool tensor of tokens whose update was clipped.
    """
    dt = logp.dtype
    adv = advantages.to(dt)
    m = mask.to(dt)
    clipped = torch.zeros_like(logp, dtype=torch.bool)
    if loss_type == "awsft":
        per_tok = -adv * logp
        g = -adv
    else:
        old = logp if old_logprobs is None else old_logprobs.to(dt)
        # Clamp the log-ratio only to keep exp() finite: a ratio of e^20 is already far outside
        # any clip range, so the clamped value changes no selected branch.
        ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
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
            raise ValueError(f"unknown loss_type {loss_type!r}")
    if kl_coef > 0.0 and ref_logprobs is not None:
        d = (ref_logprobs.to(dt) - logp).clamp(max=20.0)
        ed = torch.exp(d)
        per_tok = per_tok + kl_coef * (ed - d - 1.0)
        g = g + kl_coef * (1.0 - ed)
    clipped = clipped & (m > 0)
    return (per_tok * m).sum(), g * m, clipped
