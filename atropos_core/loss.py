"""Model → final hidden states → fused linear policy loss (`kernels.fused_linear_policy_loss`).

Why this shape: the LM head is never called. We run the base model (`model.get_decoder()`), take
its final (normed) hidden states and hand them, with the output-embedding weight, to the fused
kernel, which computes logprobs, loss and both gradients chunk by chunk: the `[tokens, vocab]`
logits are never materialised (at V=151936 and 16k tokens that is 10 GB of fp32 per micro-batch
saved; see bench/bench_train.py for the measured CPU trade-off).

FSDP2. Under `fully_shard` the output embedding is a DTensor shard outside a forward call. The
loss therefore runs inside `model.atropos_loss_forward`, a method registered with
`torch.distributed.fsdp.register_fsdp_forward_method`: FSDP runs the root's pre-forward (all-gather
of embedding, final norm, LM head) and post-forward around it exactly as around `forward`, so the
weight we read is the unsharded parameter and its gradient is reduce-scattered into the sharded
one after backward (tests/test_trainer.py checks the updated LM head against one process). Float
tensors of the batch (advantages, logprobs) reach the loss through a closure, not as method
arguments, so FSDP's mixed-precision input cast never rounds them to bf16.

Packed rows (`layout == "packed"`): the model gets `position_ids` and NO attention mask.
transformers then derives the sequence boundaries from the position-id resets: flash_attention_2
runs varlen kernels, sdpa/eager get a block-diagonal causal mask. So packed rows are correct on CPU
too (tests/test_loss.py compares a packed row with its sequences run one by one); sdpa just pays
O(T²) mask memory per row.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import kernels
from kernels import losses as _losses

from .types import MicroBatch

logger = logging.getLogger(__name__)

__all__ = ["LossConfig", "advantage_weighted_sft_loss", "micro_batch_loss", "register_loss_forward",
           "hidden_states_and_loss"]

_LOSS_METHOD = "atropos_loss_forward"


@dataclass
class LossConfig:
    """Which policy loss to train with (formulas in `kernels.losses`)."""

    loss_type: str = "grpo"
    """"awsft" (advantage-weighted SFT: -A·logp), "grpo" (PPO-clipped ratio), "cispo" (clipped IS
    weight times logp)."""
    clip_low: float = 0.2
    """Lower clip ε: the ratio is clipped at 1-ε (grpo)."""
    clip_high: float = 0.28
    """Upper clip ε: the ratio / IS weight is clipped at 1+ε (grpo, cispo)."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty to the reference logprobs (used only when the batch has them)."""
    temperature: float = 1.0
    """Sampling temperature of the inference server: logits are divided by it before softmax."""
    backend: str = "auto"
    """Kernel backend: "auto" (Triton on CUDA, torch elsewhere), "torch", "triton"."""
    chunk_size: Optional[int] = None
    """Tokens per chunk in the fused kernel; None = from the kernel's memory budget."""

    def __post_init__(self):
        try:
            _losses.check_loss_args(self.loss_type, self.clip_low, self.clip_high, self.kl_coef, self.temperature)
        except ValueError as e:
            raise ValueError(f"loss: {e}") from None
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"loss.backend must be one of {kernels.BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1 or None, got {self.chunk_size}")

    def kernel_kwargs(self) -> dict:
        return dict(loss_type=self.loss_type, clip_low=self.clip_low, clip_high=self.clip_high,
                    kl_coef=self.kl_coef, temperature=self.temperature, backend=self.backend,
                    chunk_size=self.chunk_size)


def _loss_forward(self, input_ids, attention_mask, position_ids, loss_fn):
    """Base model → last hidden state `(R, T, D)` → `loss_fn(hidden, lm_head_weight)`.

    Bound to the model as `atropos_loss_forward`; under FSDP2 registered as a forward method.
    """
    base = self.get_decoder()
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    result = loss_fn(out.last_hidden_state, self.get_output_embeddings().weight)
    # The fused loss hands back its (detached) input as a view; FSDP2 hooks the outputs of a
    # forward for backward and warns on views, so give it an owned 0-dim tensor (a free copy).
    if isinstance(result, tuple) and isinstance(result[0], torch.Tensor) and result[0]._base is not None:
        result = (result[0].clone(),) + result[1:]
    return result


def register_loss_forward(model: nn.Module) -> None:
    """Attach `atropos_loss_forward` to `model` (and register it with FSDP2 when sharded).

    Idempotent. `apply_fsdp` calls it after `fully_shard`; unsharded models get it on first use.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if getattr(model, "_atropos_loss_registered", None) == isinstance(model, FSDPModule):
        return
    # Plain attribute (not a Module/Parameter): invisible to state_dict and to parameters().
    object.__setattr__(model, _LOSS_METHOD, types.MethodType(_loss_forward, model))
    register_fsdp_forward_method(model, _LOSS_METHOD)  # no-op when not an FSDPModule
    object.__setattr__(model, "_atropos_loss_registered", isinstance(model, FSDPModule))


def hidden_states_and_loss(model: nn.Module, input_ids, attention_mask, position_ids,
                           loss_fn: Callable[[torch.Tensor, torch.Tensor], object]):
    """Run `loss_fn(last_hidden (R,T,D), output_embedding_weight (V,D))` inside the model's forward."""
    register_loss_forward(model)
    return getattr(model, _LOSS_METHOD)(input_ids, attention_mask, position_ids, loss_fn)


def _flat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.reshape(-1)


def advantage_weighted_sft_loss(model: nn.Module, input_ids: torch.Tensor, advantages: torch.Tensor,
                                loss_mask: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                                normalizer: Optional[float] = None, **loss_kwargs):
    """Advantage-weighted token loss of any HF causal LM on UNSHIFTED Atropos rows, no full logits.

    Alignment (Atropos convention): `loss_mask[b, t]`, `advantages[b, t]` (and `old_logprobs` /
    `ref_logprobs` in `loss_kwargs`) belong to token `input_ids[b, t]`, which the model predicts
    from position t-1. So the hidden state at t-1 is scored against token t with the mask and
    advantage of t; entries at t = 0 are never used (nothing predicts the first token).

    Args:
        model: a HF causal LM (Qwen2, Llama, ...; tied or untied head), optionally FSDP2-sharded.
        input_ids: `(B, T)` int64.
        advantages: `(B, T)` per-token, or `(B,)` per-sequence (broadcast over tokens).
        loss_mask: `(B, T)` 1/0 (or bool): 1 where token t is trained.
        attention_mask: `(B, T)` 1 on real tokens; padded positions are also removed from the loss.
        normalizer: divisor of the summed token losses; default = number of trained tokens.
        **loss_kwargs: `loss_type` (default "awsft"), `clip_low`, `clip_high`, `kl_coef`,
            `temperature`, `backend`, `chunk_size`, `old_logprobs` / `ref_logprobs` `(B, T)`.
    Returns:
        `(loss, stats)` as `kernels.fused_linear_policy_loss`; `stats["logprobs"]` is `(B, T-1)`.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if advantages.dim() == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"per-sequence advantages must be ({B},), got {tuple(advantages.shape)}")
        advantages = advantages[:, None].expand(B, T)
    for name, t in (("advantages", advantages), ("loss_mask", loss_mask), ("attention_mask", attention_mask),
                    ("old_logprobs", loss_kwargs.get("old_logprobs")),
                    ("ref_logprobs", loss_kwargs.get("ref_logprobs"))):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be ({B}, {T}) like input_ids, got {tuple(t.shape)}")
    mask = loss_mask.float()
    if attention_mask is not None:
        mask = mask * (attention_mask != 0).float()
    kw = dict(loss_kwargs)
    kw.setdefault("loss_type", "awsft")
    extra = {}
    for k in ("old_logprobs", "ref_logprobs"):
        v = kw.pop(k, None)
        extra[k] = v[:, 1:].reshape(-1).float() if v is not None else None
    targets = input_ids[:, 1:].reshape(-1)
    adv = advantages[:, 1:].reshape(-1).float()
    m = mask[:, 1:].reshape(-1)

    def loss_fn(hidden, weight):
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return kernels.fused_linear_policy_loss(h, weight, targets, adv, m, normalizer=normalizer, **extra, **kw)

    loss, stats = hidden_states_and_loss(model, input_ids, attention_mask, None, loss_fn)
    stats["logprobs"] = stats["logprobs"].view(B, T - 1)
    return loss, stats


def micro_batch_loss(model: nn.Module, mb: MicroBatch, cfg: LossConfig, normalizer: float,
                     num_selected: Optional[int] = None):
    """Loss of one already-shifted `MicroBatch`, divided by `normalizer` (the GLOBAL token count).

    `num_selected`: `mb.num_trained_tokens`, counted by the caller while the batch was still on the
    host. With it, on CUDA, the kernel call has no host sync: the batch was validated by
    `atropos_core.batch`, so the kernel skips its own re-validation there (on CPU it still checks:
    free there).

    Padded layout: the model gets `attention_mask` and `position_ids`. Packed layout: only
    `position_ids` (see the module docstring). Returns `(loss, stats)`; stats are detached 0-dim
    tensors (sums, so micro-batches and ranks add up without a host sync): `tokens`, `entropy_sum`,
    `clip_sum`, `logprob_sum`, and `kl_sum` / `logprob_diff_sum` when the batch carries
    `ref_logprobs` / `old_logprobs`.
    """
    if mb.layout not in ("padded", "packed"):
        raise ValueError(f"MicroBatch.layout must be 'padded' or 'packed', got {mb.layout!r}")
    mask = mb.loss_mask.reshape(-1).float()
    targets = mb.targets.reshape(-1)
    adv = mb.advantages.reshape(-1).float()
    old, ref = _flat(mb.old_logprobs), _flat(mb.ref_logprobs)
    old = old.float() if old is not None else None
    ref = ref.float() if ref is not None else None
    use_old = cfg.loss_type != "awsft"
    use_ref = cfg.kl_coef > 0

    def loss_fn(hidden, weight):
        h = hidden.reshape(-1, hidden.shape[-1])
        return kernels.fused_linear_policy_loss(
            h, weight, targets, adv, mask, old_logprobs=old if use_old else None,
            ref_logprobs=ref if use_ref else None, normalizer=normalizer, validate=h.device.type != "cuda",
            num_selected=num_selected, **cfg.kernel_kwargs())

    attn = mb.attention_mask if mb.layout == "padded" else None
    loss, st = hidden_states_and_loss(model, mb.input_ids, attn, mb.position_ids, loss_fn)
    sel = mask != 0
    n = sel.sum().float()
    logp = st["logprobs"]
    stats = {
        "tokens": n,
        "entropy_sum": st["entropy"].float() * n,
        "clip_sum": st["clip_frac"].float() * n,
        "logprob_sum": (logp * sel).sum(),
    }
    if ref is not None:
        d = torch.where(sel, ref - logp, torch.zeros_like(logp)).clamp(max=20.0)
        stats["kl_sum"] = (torch.exp(d) - d - 1.0).sum()
    if old is not None:
        stats["logprob_diff_sum"] = torch.where(sel, (logp - old).abs(), torch.zeros_like(logp)).sum()
    return loss, stats
