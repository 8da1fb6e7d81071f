"""Fused linear → log-softmax → token policy losses that never materialise `[tokens, vocab]` logits.

Public API:
    linear_logprobs(hidden, weight, targets, *, temperature=1.0, backend="auto") -> (N,) fp32
    fused_linear_policy_loss(hidden, weight, targets, advantages, loss_mask, spec, *, ...) -> (loss, stats)
    LossSpec: every loss setting (loss type, clip range, IS correction, distillation, backend, chunk)
    with its one default (`kernels.spec`); the calls take it next to their per-call tensors.

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
from .spec import BACKENDS, LossSpec

__all__ = ["linear_logprobs", "fused_linear_policy_loss", "resolve_backend", "BACKENDS", "LossSpec"]

logger = logging.getLogger(__name__)
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
                                               need_grad_hidden=False, need_grad_weight=False, ops=ops,
                                               logprobs_only=True)
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
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
    spec: Optional[LossSpec] = None,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    temperature: Optional[torch.Tensor] = None,
    normalizer: Optional[float] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    behaviour_logprobs: Optional[torch.Tensor] = None,
    behaviour_mask: Optional[torch.Tensor] = None,
    distill_ids: Optional[torch.Tensor] = None,
    distill_logprobs: Optional[torch.Tensor] = None,
    distill_mask: Optional[torch.Tensor] = None,
    validate: bool = True,
    num_selected: Optional[int] = None,
):
    """Token-level policy-gradient loss on `hidden @ weight.T` without materialising the logits.

    Args:
        hidden: `(N, D)` final hidden states (fp32/fp16/bf16).
        weight: `(V, D)` output embedding, same dtype.
        targets: `(N,)` int64 token each row predicts.
        advantages: `(N,)` per-token advantages.
        loss_mask: `(N,)` 1 for trained tokens, 0 otherwise (masked tokens are skipped entirely);
            may be a weight (e.g. 1/(n_i·S) for a sequence-mean-token-mean loss).
        spec: the loss settings (`kernels.LossSpec`; None = its defaults): loss type (formulas in
            `kernels.losses` and `kernels.reference`), clip range, KL β, temperature, IS
            correction, distillation coefficient and mode, backend, chunk size.
        old_logprobs: `(N,)` PPO old-policy logprobs (grpo/cispo/gspo); None = the current policy.
            Where `behaviour_mask` is given and 0, the current policy is used instead.
        ref_logprobs: `(N,)` reference logprobs for the KL term (used when `spec.kl_coef > 0`).
        temperature: an `(N,)` per-token temperature; None = `spec.temperature` everywhere.
        normalizer: the divisor Z; default `max(sum(loss_mask), 1)`. Pass the global trained-token
            count when a batch is split into micro-batches or across ranks.
        sequence_ids: `(N,)` sequence of each token (whole sequences per call): needed by "gspo"
            and the sequence-level `is_mode`s, and for the per-sequence IS statistics.
        behaviour_logprobs, behaviour_mask: `(N,)` the sampler's logprobs μ and where they exist
            (default everywhere); the importance weight (`spec.is_mode`, see `kernels.reference`)
            uses δ = sg(logp) - μ (0 where absent). Without them no correction applies.
        distill_ids, distill_logprobs: `(N, k)` teacher top-k ids and logprobs (used when
            `spec.distill_coef > 0`); `distill_mask` `(N,)`: rows that have a teacher (default all).
    GSPO and the sequence-level corrections need every token's logprob before any gradient: they
    run the chunk loop twice (logprobs, then the gradient pass: 8·N·D·V FLOPs instead of 6).
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
        `num_tokens`, and 0-dim sums for the off-policy and distillation metrics (`is_*`,
        `mismatch_*`, `distill_*`; see `_OFFPOLICY_STATS`).
    """
    _check_common(hidden, weight, targets)
    spec = LossSpec() if spec is None else spec
    if not isinstance(spec, LossSpec):
        raise TypeError(f"spec must be a kernels.LossSpec, got {type(spec).__name__}")
    if temperature is not None and not isinstance(temperature, torch.Tensor):
        raise ValueError("temperature here is a per-token (N,) tensor; a scalar belongs in the spec "
                         "(LossSpec(temperature=...))")
    per_tok_t = temperature is not None
    loss_type, is_mode = spec.loss_type, spec.is_mode
    distill_coef, distill_mode = spec.distill_coef, spec.distill_mode
    n = hidden.shape[0]
    vecs = {"advantages": advantages, "loss_mask": loss_mask, "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs, "behaviour_logprobs": behaviour_logprobs,
            "temperature": temperature if per_tok_t else None}
    for name, t in list(vecs.items()) + [("sequence_ids", sequence_ids), ("behaviour_mask", behaviour_mask),
                                         ("distill_mask", distill_mask)]:
        if t is not None and (t.shape != (n,) or t.device != hidden.device):
            raise ValueError(f"{name} must be ({n},) on {hidden.device}, got {tuple(t.shape)} on {t.device}")
    use_distill = distill_coef > 0 and distill_ids is not None
    if distill_coef > 0 and (distill_ids is None) != (distill_logprobs is None):
        raise ValueError("distill_ids and distill_logprobs go together")
    if loss_type == "distill" and not use_distill:
        raise ValueError("loss_type 'distill' needs distill_ids, distill_logprobs and distill_coef > 0")
    if use_distill and (distill_ids.dim() != 2 or distill_ids.shape[0] != n or distill_logprobs.shape != distill_ids.shape
                        or distill_ids.device != hidden.device):
        raise ValueError(f"distill_ids/distill_logprobs must both be ({n}, k) on {hidden.device}, got "
                         f"{tuple(distill_ids.shape)} and {tuple(distill_logprobs.shape)}")
    use_is = is_mode != "none" and behaviour_logprobs is not None
    needs_seq = loss_type == "gspo" or (use_is and is_mode in losses.SEQ_IS_MODES)
    if needs_seq and sequence_ids is None:
        raise ValueError(f"loss_type {loss_type!r} / is_mode {is_mode!r} need sequence_ids")
    if normalizer is not None and not (normalizer > 0 and normalizer == normalizer):
        raise ValueError(f"normalizer must be a positive number, got {normalizer}")
    ops = _ops_for(resolve_backend(spec.backend, hidden.device))
    chunk_size = spec.chunk_size

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
    ids_sel = lp_sel = None
    if use_distill:
        ids_sel = distill_ids[sel].long()
        lp_sel = distill_logprobs[sel].float()
        picked["distill_logprobs"] = lp_sel
        dm_sel = (distill_mask[sel].float() if distill_mask is not None
                  else torch.ones(sel.numel(), device=hidden.device))
    if validate:
        _check_targets_in_range(t_sel, weight.shape[0])
        if use_distill:
            _check_targets_in_range(ids_sel.reshape(-1), weight.shape[0])
        if per_tok_t and picked["temperature"].numel() and not bool((picked["temperature"] > 0).all()):
            raise ValueError("temperature must be > 0 at every trained position")
        finite = [torch.isfinite(v).all() for v in picked.values() if v is not None]
        finite.append(torch.isfinite(m_sel).all())
        if not bool(torch.stack(finite).all()):
            bad = [k for k, v in picked.items() if v is not None and not bool(torch.isfinite(v).all())]
            raise ValueError(f"non-finite values in {bad or ['loss_mask']} at trained positions")
    # A 0-dim tensor when the caller gives no normalizer: dividing by it needs no host sync.
    Z = float(normalizer) if normalizer is not None else m_sel.sum().clamp_min(1.0)
    bmask = None
    if behaviour_logprobs is not None or behaviour_mask is not None:
        bmask = (behaviour_mask[sel].bool() if behaviour_mask is not None
                 else torch.ones(sel.numel(), dtype=torch.bool, device=hidden.device))
    seg = n_seg = None
    if sequence_ids is not None:
        seg, n_seg = losses.segment_ids(sequence_ids[sel])
    temp_arg = picked["temperature"] if per_tok_t else float(spec.temperature)
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    all_sel = sel.numel() == n  # every token trained: skip the gather/scatter copies of (N, D)
    h_sel = hidden.detach() if all_sel else hidden.detach()[sel]
    w_det = weight.detach().contiguous()

    # Pass 1 (GSPO, sequence-level IS): every token's logprob, no gradient (2·N·D·V FLOPs), logprob-only
    # row pass (lse and the target logit; no entropy, no dZ).
    pre_g = pre_w = pre_clip = None
    pre_loss = None
    if needs_seq:
        logp1, _, _, _ = chunked_loss_and_grads(h_sel, w_det, t_sel, lambda r, lp: None, temperature=temp_arg,
                                                need_grad_hidden=False, need_grad_weight=False, ops=ops,
                                                chunk_size=chunk_size, logprobs_only=True)
        if use_is:
            delta = torch.where(bmask, logp1 - picked["behaviour_logprobs"], torch.zeros_like(logp1))
            if is_mode in losses.SEQ_IS_MODES:
                w_s, tr_s, ms_s = losses.seq_is_weights(
                    losses.segment_sum(delta, seg, n_seg), losses.segment_sum(torch.ones_like(delta), seg, n_seg),
                    spec)
                pre_w, pre_tr, pre_ms = w_s[seg], tr_s[seg], ms_s[seg]
            else:
                pre_w, pre_tr, pre_ms = losses.is_weights(delta, spec)
        if loss_type == "gspo":
            old1 = picked["old_logprobs"]
            if old1 is not None and bmask is not None:
                old1 = torch.where(bmask, old1, logp1)
            pre_loss, pre_g, pre_clip, _ = losses.gspo_coefficients(
                logp1, old1, picked["advantages"], m_sel, seg, n_seg, spec, is_weight=pre_w)

    acc = {k: [] for k in ("loss", "clip", "w_sum", "w_max", "trunc", "masked", "k3", "absd", "dkl", "top1")}
    flags_tok = []  # per chunk: (truncated | masked) tokens, for the per-sequence counts

    def coef_fn(rows, logp_c, extra=None):
        m_c = m_sel[rows]
        w_c = None
        if use_is:
            delta = torch.where(bmask[rows], logp_c - picked["behaviour_logprobs"][rows], torch.zeros_like(logp_c))
            if pre_w is not None:  # from the first pass
                w_c, tr_c, ms_c = pre_w[rows], pre_tr[rows], pre_ms[rows]
            else:
                w_c, tr_c, ms_c = losses.is_weights(delta, spec)
            acc["w_sum"].append(w_c.sum())
            acc["w_max"].append(w_c.max() if w_c.numel() else torch.zeros((), device=w_c.device))
            acc["trunc"].append(tr_c.sum())
            acc["masked"].append(ms_c.sum())
            flags_tok.append(tr_c | ms_c)
        if behaviour_logprobs is not None:
            dlt = torch.where(bmask[rows], logp_c - picked["behaviour_logprobs"][rows], torch.zeros_like(logp_c))
            acc["k3"].append((torch.exp(dlt.clamp(max=20.0)) - dlt - 1.0).sum())
            acc["absd"].append(dlt.abs().sum())
        if loss_type == "gspo":
            # the policy term is in pre_loss / pre_g; only the KL term is token-local here
            loss_c, g_c, _ = losses.token_loss_and_grad(
                logp_c, picked["advantages"][rows], m_c, spec, ref_logprobs=None if picked["ref_logprobs"] is None
                else picked["ref_logprobs"][rows], policy=False)
            g_c = g_c + pre_g[rows]
            acc["clip"].append(pre_clip[rows].sum())
        else:
            old_c = None if picked["old_logprobs"] is None else picked["old_logprobs"][rows]
            if old_c is not None and bmask is not None:  # no behaviour logprob: on-policy (ratio 1)
                old_c = torch.where(bmask[rows], old_c, logp_c)
            loss_c, g_c, clipped_c = losses.token_loss_and_grad(
                logp_c, picked["advantages"][rows], m_c, spec, old_logprobs=old_c,
                ref_logprobs=None if picked["ref_logprobs"] is None else picked["ref_logprobs"][rows], is_weight=w_c)
            acc["clip"].append(clipped_c.sum())
        acc["loss"].append(loss_c)
        if extra is None:
            return g_c / Z
        logp_k, is_max = extra
        term, d_xk, d_p, kl = losses.distill_loss_and_grad(logp_k, lp_sel[rows], distill_mode)
        dm_c = dm_sel[rows]
        acc["loss"].append(distill_coef * (term * m_c * dm_c).sum())
        acc["dkl"].append((kl * dm_c).sum())
        t1 = lp_sel[rows].argmax(1, keepdim=True)
        acc["top1"].append((is_max.gather(1, t1).squeeze(1) * dm_c).sum())
        lam = (distill_coef / Z) * m_c * dm_c
        return g_c / Z, d_xk * lam.unsqueeze(1), (d_p * lam if distill_mode == "ce" else None)

    logp_sel, ent_sel, gh_sel, gw = chunked_loss_and_grads(
        h_sel, w_det, t_sel, coef_fn, temperature=temp_arg,
        need_grad_hidden=need and hidden.requires_grad, need_grad_weight=need and weight.requires_grad,
        ops=ops, chunk_size=chunk_size, grad_weight_dtype=weight.dtype, gather_ids=ids_sel)

    dev = hidden.device
    zero = torch.zeros((), device=dev)
    parts = acc["loss"] + ([pre_loss] if pre_loss is not None else [])
    loss = (torch.stack(parts).sum() / Z).float() if parts else zero
    n_sel = max(sel.numel(), 1)
    logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
    logprobs[sel] = logp_sel
    ssum = lambda k: torch.stack(acc[k]).sum().float() if acc[k] else zero  # noqa: E731
    stats = {
        "logprobs": logprobs,
        "entropy": (ent_sel * m_sel).sum() / m_sel.sum().clamp_min(1e-12) if sel.numel() else zero,
        "clip_frac": ssum("clip") / n_sel,
        "num_tokens": int(sel.numel()),
    }
    if behaviour_logprobs is not None:
        stats.update(behaviour_tokens=bmask.sum().float(), mismatch_k3_sum=ssum("k3"), mismatch_abs_sum=ssum("absd"))
    if use_is:
        stats.update(is_weight_sum=ssum("w_sum"), is_truncated_tokens=ssum("trunc"), is_masked_tokens=ssum("masked"),
                     is_weight_max=torch.stack(acc["w_max"]).max().float() if acc["w_max"] else zero)
        if seg is not None:
            flagged = torch.cat(flags_tok) if flags_tok else torch.zeros(0, dtype=torch.bool, device=dev)
            per_seq = losses.segment_sum(flagged.float(), seg, n_seg) > 0
            n_seqs = (seg[-1] + 1).float() if seg.numel() else zero
            stats.update(is_sequences=n_seqs, is_flagged_sequences=per_seq.sum().float())
    if use_distill:
        stats.update(distill_kl_sum=ssum("dkl"), distill_top1_sum=ssum("top1"),
                     distill_tokens=dm_sel.sum())
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
