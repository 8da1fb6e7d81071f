"""The one naive reference: full `[N, V]` logits, plain autograd, the definitions as written.

Tests, benchmarks and documentation all import these; nobody keeps a second copy. With
`upcast=True` everything runs in float64 (the "gold"); with `upcast=False` the matmul runs in the
inputs' dtype and the softmax in float32, which is what a careful user of plain torch writes (the
"torch in the same dtype" baseline of the tests' error rule `err <= 2 * torch_err + atol`).
The loss settings come from a `kernels.spec.LossSpec`, as for the kernels.

Definitions (m = loss_mask, a weight; "trained" = m != 0; Z = normalizer; sg = stop-gradient):
- temperature: a float or a per-token `(N,)` tensor; row i's logits are divided by T_i.
- off-policy correction (`is_mode`, needs `behaviour_logprobs` μ): δ_t = sg(logp_t) − μ_t on tokens
  with a behaviour logprob (`behaviour_mask`), 0 elsewhere. Token modes: w_t = min(e^δ, C)
  ("token_tis") or 1[lo ≤ e^δ ≤ hi] ("token_mask"). Sequence modes, S_i = Σ_{t∈i, trained} δ_t,
  n_i = trained tokens of i: w_i = min(e^S, C) ("seq_tis"), 1[lo ≤ e^S ≤ hi] ("seq_mask"),
  1[glo ≤ e^{S/n} ≤ ghi] ("geo_mask"). The policy term of every token is multiplied by sg(w).
- GSPO (`loss_type="gspo"`, needs `sequence_ids`): s_i = exp(mean_{t∈i, trained}(logp_t − old_t)),
  A_i = mean of the advantages over i's trained tokens, ℓ_i = max(−s_i·A_i, −clip(s_i, 1−εl, 1+εh)·A_i),
  loss term Σ_i (Σ_{t∈i} m_t)·w_i·ℓ_i (so with m_t = 1/(n_i·S) it is the GSPO paper's mean over
  sequences). Gradients flow through s_i into every token of i.
- `old_logprobs` (PPO old policy) counts only where `behaviour_mask` is set; elsewhere old = sg(logp).
- "distill" (`loss_type`): no policy term, only the distillation term below.
- distillation (`distill_coef` λ > 0, `distill_ids`/`distill_logprobs` `(N, k)`): q = softmax of the
  teacher's top-k logprobs (renormalised). "kl": KL(q ‖ s) with s the student's softmax restricted
  to the same k ids and renormalised; "ce": −Σ_j q_j·log p_j with the student's full softmax p.
  Added as λ·Σ_t m_t·D_t over the rows of `distill_mask` (default all).
- loss = (Σ_t m_t·(policy_t + kl_t) + distill) / Z.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .spec import LossSpec


def _logp_all(hidden, weight, temperature, upcast: bool):
    if upcast:
        hidden, weight = hidden.double(), weight.double()
    logits = (hidden @ weight.T)
    logits = logits.to(torch.float64 if upcast else torch.float32)
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(logits.dtype).unsqueeze(1)
    else:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def linear_logprobs_ref(hidden, weight, targets, temperature: Union[float, torch.Tensor] = 1.0, upcast: bool = True):
    """`log_softmax(hidden @ weight.T / T)[i, targets[i]]` and the per-token entropy, both `(N,)`."""
    logp_all = _logp_all(hidden, weight, temperature, upcast)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def distill_ref(logp_all, ids, teacher_logprobs, mode: str = "kl"):
    """Per-token distillation term `(N,)` and top-1 agreement `(N,)` bool (see the module docstring)."""
    dt = logp_all.dtype
    q = torch.softmax(teacher_logprobs.to(dt), dim=-1)
    lp_k = logp_all.gather(1, ids.long())
    if mode == "kl":
        log_s = torch.log_softmax(lp_k, dim=-1)
        term = (q * (torch.log(q.clamp_min(1e-300)) - log_s)).sum(-1)
    elif mode == "ce":
        term = -(q * lp_k).sum(-1)
    else:
        raise ValueError(f"unknown distill mode {mode!r}")
    top1 = logp_all.argmax(-1) == ids.long().gather(1, teacher_logprobs.argmax(-1, keepdim=True)).squeeze(1)
    return term, top1


def _segment(values, seg, n_seg):
    return torch.zeros(n_seg, dtype=values.dtype).index_add_(0, seg, values)


def is_weights_ref(logp, behaviour, behaviour_mask, trained, seq, n_seg, spec: LossSpec):
    """`(w, truncated, masked)` per token, all detached (see the module docstring)."""
    mode, cap, low, high = spec.is_mode, spec.is_cap, spec.is_low, spec.is_high
    delta = torch.where(behaviour_mask & trained, logp.detach() - behaviour.to(logp.dtype), torch.zeros_like(logp))
    zero = torch.zeros_like(trained)
    if mode in ("token_tis", "token_mask"):
        r = torch.exp(delta)
        if mode == "token_tis":
            return torch.clamp(r, max=cap), (r > cap) & trained, zero
        keep = (r >= low) & (r <= high)
        return keep.to(logp.dtype), zero, (~keep) & trained
    tr = trained.to(logp.dtype)
    S = _segment(delta * tr, seq, n_seg)
    n = _segment(tr, seq, n_seg).clamp(min=1)
    if mode == "seq_tis":
        R = torch.exp(S)
        w = torch.clamp(R, max=cap)
        return w[seq], (R > cap)[seq] & trained, zero
    if mode == "seq_mask":
        R = torch.exp(S)
        keep = (R >= low) & (R <= high)
    elif mode == "geo_mask":
        G = torch.exp(S / n)
        keep = (G >= spec.geo_low) & (G <= spec.geo_high)
    else:
        raise ValueError(f"unknown is_mode {mode!r}")
    return keep.to(logp.dtype)[seq], zero, (~keep)[seq] & trained


def policy_loss_ref(hidden, weight, targets, advantages, loss_mask, spec: Optional[LossSpec] = None, *,
                    old_logprobs=None, ref_logprobs=None, temperature=None, normalizer=None, sequence_ids=None,
                    behaviour_logprobs=None, behaviour_mask=None, distill_ids=None, distill_logprobs=None,
                    distill_mask=None, upcast: bool = True):
    """Reference of `kernels.fused_linear_policy_loss`: its arguments (less `validate` and
    `num_selected`; tests/test_kernels.py checks that they agree), the same `(loss, stats)`.
    `spec.backend` and `spec.chunk_size` do not apply here."""
    spec = LossSpec() if spec is None else spec
    loss_type, clip_low, clip_high, kl_coef = spec.loss_type, spec.clip_low, spec.clip_high, spec.kl_coef
    distill_coef, distill_mode = spec.distill_coef, spec.distill_mode
    temperature = spec.temperature if temperature is None else temperature
    logp_all = _logp_all(hidden, weight, temperature, upcast)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    dt = logp.dtype
    m = loss_mask.to(dt)
    trained = m != 0
    A = advantages.to(dt)
    Z = torch.as_tensor(normalizer if normalizer is not None else max(float(m.sum()), 1.0), dtype=dt)
    clipped = torch.zeros_like(m, dtype=torch.bool)
    seq = n_seg = None
    if sequence_ids is not None:
        uniq, seq = torch.unique(torch.where(trained, sequence_ids, sequence_ids.min() - 1), return_inverse=True)
        n_seg = len(uniq)
    bm_all = None if behaviour_mask is None else behaviour_mask.bool()
    if old_logprobs is not None and bm_all is not None:  # no behaviour logprob: the current policy
        old_logprobs = torch.where(bm_all, old_logprobs.to(dt), logp.detach())
    w = torch.ones_like(m)
    trunc = masked = torch.zeros_like(trained)
    if spec.is_mode != "none" and behaviour_logprobs is not None:
        bm = torch.ones_like(trained) if behaviour_mask is None else behaviour_mask.bool()
        w, trunc, masked = is_weights_ref(logp, behaviour_logprobs, bm, trained, seq, n_seg, spec)
    if loss_type == "distill":
        per_tok = torch.zeros_like(logp)
    elif loss_type == "awsft":
        per_tok = -A * logp
    elif loss_type == "gspo":
        old = logp.detach() if old_logprobs is None else old_logprobs.to(dt)
        tr = trained.to(dt)
        n = _segment(tr, seq, n_seg).clamp(min=1)
        s = torch.exp(_segment((logp - old) * tr, seq, n_seg) / n)
        A_i = _segment(A * tr, seq, n_seg) / n
        ell = torch.maximum(-s * A_i, -torch.clamp(s, 1 - clip_low, 1 + clip_high) * A_i)
        cl = ((s > 1 + clip_high) & (A_i > 0)) | ((s < 1 - clip_low) & (A_i < 0))
        # Σ_t m_t·ℓ_{seq(t)} written per token, so the sum below gives Σ_i (Σ_t m_t) ℓ_i.
        per_tok = ell[seq]
        clipped = cl[seq]
    else:
        old = logp.detach() if old_logprobs is None else old_logprobs.to(dt)
        r = torch.exp(logp - old)
        if loss_type == "grpo":
            per_tok = torch.maximum(-r * A, -torch.clamp(r, 1 - clip_low, 1 + clip_high) * A)
            clipped = ((r > 1 + clip_high) & (A > 0)) | ((r < 1 - clip_low) & (A < 0))
        elif loss_type == "cispo":
            per_tok = -torch.clamp(r, max=1 + clip_high).detach() * A * logp
            clipped = r > 1 + clip_high
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
    per_tok = per_tok * w
    if kl_coef > 0 and ref_logprobs is not None:
        d = ref_logprobs.to(dt) - logp
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1)
    dkl = top1 = None
    if distill_coef > 0 and distill_ids is not None:
        dterm, top1 = distill_ref(logp_all, distill_ids, distill_logprobs, distill_mode)
        dm = torch.ones_like(trained) if distill_mask is None else distill_mask.bool()
        dterm = dterm * dm
        top1 = top1 & dm
        per_tok = per_tok + distill_coef * dterm
        dkl = dterm if distill_mode == "kl" else distill_ref(logp_all, distill_ids, distill_logprobs, "kl")[0] * dm
    loss = (per_tok * m).sum() / Z
    n_tok = m.sum().clamp(min=1)
    n_tr = trained.sum().clamp(min=1)
    stats = {
        "logprobs": (logp * trained).detach(),
        "entropy": ((entropy * m).sum() / n_tok).detach(),
        "clip_frac": ((clipped & trained).to(dt).sum() / n_tr).detach(),
        "is_weight": (w * trained).detach(),
        "is_truncated": (trunc & trained),
        "is_masked": (masked & trained),
    }
    if dkl is not None:
        stats["distill_kl"] = (dkl * trained).detach()
        stats["distill_top1"] = top1 & trained
    return loss, stats


def large_logit_inputs(n: int, d: int, v: int, dtype, *, seed: int = 0, device="cpu", logit_std: float = 7.0,
                       top_k: int = 16):
    """`(hidden, weight, targets)` whose target logits sit at |z| ~ 16-32, as in a trained LM.

    A trained model's sampled tokens have large logits (16-32 for Llama/Qwen-size heads), where one
    bf16 ulp is 0.125: rounding the logits to bf16 before the softmax puts up to ~0.06 of error into
    each logp. Here logits have std `logit_std` over the vocabulary and each target is drawn among
    its row's `top_k` largest fp64 logits (so it is large but does not dominate the softmax, and its
    rounding error does not cancel against the log-sum-exp's). For the logp-error tests."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (logit_std / d ** 0.5)
    pick = torch.randint(0, min(top_k, v), (n,), generator=g)
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    z = hidden.double() @ weight.double().T        # on `device`: large shapes are a GPU's job
    top = z.topk(min(top_k, v), dim=1).indices
    targets = top[torch.arange(n, device=top.device), pick.to(top.device)]
    return hidden, weight, targets
