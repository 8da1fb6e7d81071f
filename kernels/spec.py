"""`LossSpec`: every setting of the policy loss, written once, with one default each, checked once.

`kernels.fused_linear_policy_loss`, `kernels.reference.policy_loss_ref` and the loss heads of
`kernels.losses` take a `LossSpec` next to their per-call tensors (advantages, masks, old /
reference / behaviour / teacher logprobs, a per-token temperature, the normaliser). The trainer's
`atropos_core.loss.LossConfig` is a subclass that adds only trainer-side fields, so the config
section `loss.*` is this class's fields.

The defaults are the trainer's (what a user of `drivers/train.py` gets). For a direct caller of the
kernels they changed when the spec was introduced (issue #14), from the kernels' former keyword
defaults:
  - `loss_type`: "awsft" -> "grpo"
  - `clip_high`: 0.2 -> 0.28
  - `is_mode`: "none" -> "token_tis" (applies only where `behaviour_logprobs` are passed)
Pass `LossSpec(loss_type="awsft", clip_high=0.2, is_mode="none")` for the former behaviour.

The spec is frozen: derive a variant with `dataclasses.replace(spec, field=value)`, which checks
the new value too. This module imports neither torch nor anything outside `kernels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("awsft", "grpo", "cispo", "gspo", "distill")
IS_MODES = ("none", "token_tis", "token_mask", "seq_tis", "seq_mask", "geo_mask")
SEQ_IS_MODES = ("seq_tis", "seq_mask", "geo_mask")
DISTILL_MODES = ("kl", "ce")
BACKENDS = ("auto", "triton", "torch")


def _band_ok(low: float, high: float) -> bool:
    return 0.0 <= low < 1.0 < high and math.isfinite(high)


@dataclass(frozen=True)
class LossSpec:
    """Which policy loss to compute and how (formulas in `kernels.losses` / `kernels.reference`)."""

    loss_type: str = "grpo"
    """"awsft" (advantage-weighted SFT: -A·logp), "grpo" (PPO-clipped ratio), "cispo" (clipped IS
    weight times logp), "gspo" (sequence-level ratio, length-normalised; two passes), "distill"
    (only the distillation term: no reward needed)."""
    clip_low: float = 0.2
    """Lower clip ε: the ratio is clipped at 1-ε (grpo, gspo). GSPO's paper uses ~3e-4."""
    clip_high: float = 0.28
    """Upper clip ε: the ratio / IS weight is clipped at 1+ε (grpo, cispo, gspo). GSPO: ~4e-4."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty to the reference logprobs (used only when the batch has them)."""
    temperature: float = 1.0
    """Sampling temperature of the inference server where a sequence does not say its own
    (`overrides[i]` > `generation_params` > `group_overrides` > this): logits are divided by it.
    A per-token `(N,)` temperature passed to the kernel call replaces it."""
    is_mode: str = "token_tis"
    """Correction for the gap between the behaviour policy (the sampler's `inference_logprobs`) and
    the policy trained: "token_tis" (weight min(π/μ, is_cap) per token), "token_mask" (tokens
    outside [is_low, is_high] get weight 0), "seq_tis" / "seq_mask" (the same on the product of a
    sequence's ratios), "geo_mask" (sequences whose per-token geometric-mean ratio leaves
    [geo_low, geo_high] are masked), or "none" (the behaviour logprobs become the PPO old policy:
    the ratio π/μ is clipped, not weighted). With a correction on, the PPO old policy is the
    current one (one optimizer step per batch: ratio 1) and the weight is detached.
    Default token_tis with C = 2: the truncated-IS fix of Yao et al. 2025 ("Your efficient RL
    framework secretly brings you off-policy RL training") at the cap they and ms-swift
    (`rollout_importance_sampling_threshold`, default 2.0) ship; truncation keeps every token, where
    masking drops data. Sequence modes need a first pass (8·N·D·V FLOPs, see docs/kernels.md)."""
    is_cap: float = 2.0
    """C of token_tis / seq_tis."""
    is_low: float = 0.5
    """Lower bound of token_mask / seq_mask (0.5-2.0 is slime's masked-IS example band)."""
    is_high: float = 2.0
    """Upper bound of token_mask / seq_mask."""
    geo_low: float = 0.9
    """Lower bound of geo_mask's per-token geometric-mean ratio (our choice: ±~10% per token)."""
    geo_high: float = 1.1
    """Upper bound of geo_mask."""
    distill_coef: float = 0.0
    """λ of the distillation term over the teacher's top-k (`distill_token_ids`/`distill_logprobs`);
    0 = off. loss_type "distill" needs it > 0."""
    distill_mode: str = "kl"
    """"kl": KL(teacher ‖ student), both renormalised over the teacher's top-k; "ce": teacher
    cross-entropy against the student's full softmax (teacher renormalised)."""
    backend: str = "auto"
    """Kernel backend: "auto" (Triton on CUDA, torch elsewhere), "torch", "triton"."""
    chunk_size: Optional[int] = None
    """Tokens per chunk in the fused kernel; None = from the kernel's memory budget."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ValueError, naming the field first, for a setting that cannot be computed."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not (0.0 <= self.clip_low < 1.0):
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        for name in ("clip_high", "kl_coef", "distill_coef"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.is_mode not in IS_MODES:
            raise ValueError(f"is_mode must be one of {IS_MODES}, got {self.is_mode!r}")
        if not (self.is_cap >= 1.0 and math.isfinite(self.is_cap)):
            raise ValueError(f"is_cap must be a finite number >= 1, got {self.is_cap}")
        for lo, hi in (("is_low", "is_high"), ("geo_low", "geo_high")):
            if not _band_ok(getattr(self, lo), getattr(self, hi)):
                raise ValueError(f"{lo}/{hi} must satisfy 0 <= low < 1 < high < inf, "
                                 f"got [{getattr(self, lo)}, {getattr(self, hi)}]")
        if self.distill_mode not in DISTILL_MODES:
            raise ValueError(f"distill_mode must be one of {DISTILL_MODES}, got {self.distill_mode!r}")
        if self.loss_type == "distill" and self.distill_coef <= 0:
            raise ValueError("loss_type 'distill' needs distill_coef > 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
