"""The one naive reference: full `[N, V]` logits, plain autograd, the definitions as written.

Tests, benchmarks and documentation all import these; nobody keeps a second copy. With
`upcast=True` everything runs in float64 (the "gold"); with `upcast=False` the matmul runs in the
inputs' dtype and the softmax in float32, which is what a careful user of plain torch writes (the
"torch in the same dtype" baseline of the error rule in STYLE.md).
"""
from __future__ import annotations

from typing import Optional

import torch


def linear_logprobs_ref(hidden, weight, targets, temperature: float = 1.0, upcast: bool = True):
    """`log_softmax(hidden @ weight.T / T)[i, targets[i]]` and the per-token entropy, both `(N,)`."""
    if upcast:
        hidden, weight = hidden.double(), weight.double()
    logits = (hidden @ weight.T)
    logits = logits.to(torch.float64 if upcast else torch.float32) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_loss_ref(
    hidden, weight, targets, advantages, loss_mask, *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    loss_type: str = "awsft",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    temperature: float = 1.0,
    normalizer: Optional[float] = None,
    upcast: bool = True,
):
    """Reference of `kernels.fused_linear_policy_loss`; same arguments, same `(loss, stats)`."""
    logp, entropy = linear_logprobs_ref(hidden, weight, targets, temperature, upcast)
    dt = logp.dtype
    m = loss_mask.to(dt)
    A = advantages.to(dt)
    Z = torch.as_tensor(normalizer if normalizer is not None else max(float(m.sum()), 1.0), dtype=dt)
    clipped = torch.zeros_like(m, dtype=torch.bool)
    if loss_type == "awsft":
        per_tok = -A * logp
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
    if kl_coef > 0 and ref_logprobs is not None:
        d = ref_logprobs.to(dt) - logp
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1)
    loss = (per_tok * m).sum() / Z
    n_tok = m.sum().clamp(min=1)
    stats = {
        "logprobs": (logp * (m > 0)).detach(),
        "entropy": ((entropy * m).sum() / n_tok).detach(),
        "clip_frac": ((clipped & (m > 0)).to(dt).sum() / n_tok).detach(),
    }
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
