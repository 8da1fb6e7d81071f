"""Fused linear → log-softmax → token policy losses that never materialise `[tokens, vocab]` logits.

Public API:
    linear_logprobs(hidden, weight, targets, *, temperature=1.0, backend="auto") -> (N,) fp32
    fused_linear_policy_loss(hidden, weight, targets, advantages, loss_mask, *, ...) -> (loss, stats)

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch" (chunked pure
torch, any device), "auto" (Triton on CUDA when it imports, torch elsewhere; the choice is logged
once). Both share the chunk loop of `kernels.chunked` and the loss heads of `kernels.losses`;
`kernels.reference` holds the naive full-logits reference the tests compare against.

This package imports nothing from `atropos_core` and needs neither Triton nor CUDA to import.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import losses
from .chunked import TorchOps, chunked_loss_and_grads

__all__ = ["linear_logprobs", "fused_linear_policy_loss", "resolve_backend", "BACKENDS"]

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "torch")
_logged_choices: set = set()


def _triton_ops():
    from .triton_linear_loss import TritonOps  # imported lazily: triton is optional

    return TritonOps


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device`; check that an explicit one can run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton":
        if device.type != "cuda" and not interpret:
            raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
        return "triton"
    choice = "torch"
    if device.type == "cuda":
        try:
            _triton_ops()
            choice = "triton"
        except ImportError as e:  # pragma: no cover - depends on the install
            reason = f"triton unavailable ({e})"
            if ("cuda", reason) not in _logged_choices:
                logger.warning("kernels: falling back to the torch backend on CUDA: %s", reason)
                _logged_choices.add(("cuda", reason))
    if (device.type, choice) not in _logged_choices:
        logger.info("kernels: backend 'auto' uses %r on %s", choice, device.type)
        _logged_choices.add((device.type, choice))
    return choice


def _ops_for(backend: str):
    return _triton_ops() if backend == "triton" else TorchOps


def _check_common(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, D) and weight (V, D); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one float dtype; got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("hidden, weight and targets must be on one device")


def _check_targets_in_range(targets: torch.Tensor, vocab: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}); got min {int(targets.min())}, max {int(targets.max())}")


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ops):
        logp, _, _, _ = chunked_loss_and_grads(hidden, weight, targets, lambda r, lp: None, temperature=temperature,
                                               need_grad_hidden=False, need_grad_weight=False, ops=ops)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.ops = temperature, ops
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets = ctx.saved_tensors
        go = grad_logp.float()
        _, _, gh, gw = chunked_loss_and_grads(
            hidden, weight, targets, lambda rows, lp: go[rows], temperature=ctx.temperature,
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1], ops=ctx.ops,
            grad_weight_dtype=weight.dtype)
        return gh, gw, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    temperature: float = 1.0, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """Log-probability of each target under `softmax(hidden @ weight.T / temperature)`.

    Args:
        hidden: `(N, D)` fp32/fp16/bf16.
        weight: `(V, D)`, same dtype (an output embedding / LM head).
        targets: `(N,)` int64 in `[0, V)`.
        validate: check that the target ids lie in range (reads two values back to the host);
            False where the caller already checked them.
    Returns:
        `(N,)` float32, differentiable with respect to `hidden` and `weight` (the backward pass
        recomputes logits chunk by chunk; nothing of size N×V is kept).
    """
    _check_common(hidden, weight, targets)
    losses.check_loss_args("awsft", 0.0, 0.0, 0.0, temperature)
    if validate:
        _check_targets_in_range(targets, weight.shape[0])
    ops = _ops_for(resolve_backend(backend, hidden.device))
    return _LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.long(), float(temperature), ops)


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_h, grad_w):
        # The gradients were computed with the loss (grad-in-forward); autograd only scales them.
        # Held on ctx rather than saved: backward hands them over (scaled in place) and drops its
        # references, so autograd can adopt the buffer as `.grad` without a second (V, D) copy.
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_policy_loss: backward ran twice (its gradients are handed over once)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # Skip the two scaling passes when the incoming gradient is 1 (the usual `loss.backward()`);
        # the check reads the scalar, so only on CPU, where that is free (on CUDA it would sync).
        # grad_w already has the weight's dtype (cast in the chunk loop): scaling it by s != 1
        # rounds twice (fp32 -> dtype, then the product), one extra rounding of the dtype.
        unit = grad_loss.device.type == "cpu" and bool(grad_loss == 1)
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = grad_h if unit else grad_h.mul_(grad_loss.to(grad_h.dtype))
        if ctx.needs_input_grad[1]:
            gw = grad_w if unit else grad_w.mul_(grad_loss)
        return gh, gw, None, None, None


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    loss_type: str = "awsft",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    temperature: float = 1.0,
    normalizer: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    validate: bool = True,
    num_selected: Optional[int] = None,
):
    """Token-level policy-gradient loss on `hidden @ weight.T` without materialising the logits.

    Args:
        hidden: `(N, D)` final hidden states (fp32/fp16/bf16).
        weight: `(V, D)` output embedding, same dtype.
        targets: `(N,)` int64 token each row predicts.
        advantages: `(N,)` per-token advantages.
        loss_mask: `(N,)` 1 for trained tokens, 0 otherwise (masked tokens are skipped entirely).
        old_logprobs: `(N,)` behaviour-policy logprobs (grpo/cispo); None = the current policy.
        ref_logprobs: `(N,)` reference logprobs for the KL term (used when `kl_coef > 0`).
        loss_type: "awsft" | "grpo" | "cispo" (formulas in `kernels.losses`).
        normalizer: the divisor Z; default `max(sum(loss_mask), 1)`. Pass the global trained-token
            count when a batch is split into micro-batches or across ranks.
        chunk_size: tokens per chunk; default from a memory budget (see `kernels.chunked`).
        validate: check target ids and the finiteness of the per-token inputs at trained positions
            (a clear ValueError; costs host syncs). False where the caller already validated the
            batch (the trainer: `atropos_core.batch`), which leaves the call free of host syncs
            when `num_selected` and `normalizer` are given too.
        num_selected: the number of nonzero `loss_mask` entries when the caller knows it (counted
            on the host before the batch moved to the device): the selection then needs no sync
            (`torch.nonzero_static`). A wrong count is the caller's bug: rows are dropped or the
            first row is repeated, so only pass a count you computed from this mask.
    Returns:
        `(loss, stats)`: a 0-dim float32 loss, and detached stats `logprobs` `(N,)` (0.0 where the
        mask is 0: those tokens are never computed), `entropy` (masked mean), `clip_frac`,
        `num_tokens`.
    """
    _check_common(hidden, weight, targets)
    losses.check_loss_args(loss_type, clip_low, clip_high, kl_coef, temperature)
    n = hidden.shape[0]
    vecs = {"advantages": advantages, "loss_mask": loss_mask, "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs}
    for name, t in vecs.items():
        if t is not None and (t.shape != (n,) or t.device != hidden.device):
            raise ValueError(f"{name} must be ({n},) on {hidden.device}, got {tuple(t.shape)} on {t.device}")
    if normalizer is not None and not (normalizer > 0 and normalizer == normalizer):
        raise ValueError(f"normalizer must be a positive number, got {normalizer}")
    ops = _ops_for(resolve_backend(backend, hidden.device))

    nz = loss_mask != 0
    if num_selected is None:
        sel = nz.nonzero().squeeze(1)  # one host sync per call (the count), never per chunk
    else:
        if not 0 <= num_selected <= n:
            raise ValueError(f"num_selected must be in [0, {n}], got {num_selected}")
        sel = torch.nonzero_static(nz, size=int(num_selected), fill_value=0).squeeze(1)
    m_sel = loss_mask[sel].float()
    t_sel = targets[sel].long()
    picked = {k: (v[sel].float() if v is not None else None) for k, v in vecs.items() if k != "loss_mask"}
    if validate:
        _check_targets_in_range(t_sel, weight.shape[0])
        finite = [torch.isfinite(v).all() for v in picked.values() if v is not None]
        finite.append(torch.isfinite(m_sel).all())
        if not bool(torch.stack(finite).all()):
            bad = [k for k, v in picked.items() if v is not None and not bool(torch.isfinite(v).all())]
            raise ValueError(f"non-finite values in {bad or ['loss_mask']} at trained positions")
    # A 0-dim tensor when the caller gives no normalizer: dividing by it needs no host sync.
    Z = float(normalizer) if normalizer is not None else m_sel.sum().clamp_min(1.0)

    loss_parts, clip_parts = [], []

    def coef_fn(rows, logp_c):
        loss_c, g_c, clipped_c = losses.token_loss_and_grad(
            logp_c, picked["advantages"][rows], m_sel[rows],
            old_logprobs=None if picked["old_logprobs"] is None else picked["old_logprobs"][rows],
            ref_logprobs=None if picked["ref_logprobs"] is None else picked["ref_logprobs"][rows],
            loss_type=loss_type, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef)
        loss_parts.append(loss_c)
        clip_parts.append(clipped_c.sum())
        return g_c / Z

    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    all_sel = sel.numel() == n  # every token trained: skip the gather/scatter copies of (N, D)
    h_sel = hidden.detach() if all_sel else hidden.detach()[sel]
    logp_sel, ent_sel, gh_sel, gw = chunked_loss_and_grads(
        h_sel, weight.detach().contiguous(), t_sel, coef_fn, temperature=float(temperature),
        need_grad_hidden=need and hidden.requires_grad, need_grad_weight=need and weight.requires_grad,
        ops=ops, chunk_size=chunk_size, grad_weight_dtype=weight.dtype)

    dev = hidden.device
    loss = (torch.stack(loss_parts).sum() / Z).float() if loss_parts else torch.zeros((), device=dev)
    n_sel = max(sel.numel(), 1)
    logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
    logprobs[sel] = logp_sel
    stats = {
        "logprobs": logprobs,
        "entropy": (ent_sel * m_sel).sum() / m_sel.sum().clamp_min(1e-12) if sel.numel() else torch.zeros((), device=dev),
        "clip_frac": (torch.stack(clip_parts).sum().float() / n_sel) if clip_parts else torch.zeros((), device=dev),
        "num_tokens": int(sel.numel()),
    }
    if need:
        grad_h = None
        if gh_sel is not None and all_sel:
            grad_h = gh_sel
        elif gh_sel is not None:
            grad_h = torch.zeros_like(hidden)
            grad_h[sel] = gh_sel
        grad_h = grad_h if grad_h is not None else torch.zeros((), device=dev)
        grad_w = gw if gw is not None else torch.zeros((), device=dev)
        loss = _FusedPolicyLoss.apply(hidden, weight, loss.detach(), grad_h, grad_w)
    return loss, stats
