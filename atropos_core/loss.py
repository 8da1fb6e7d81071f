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
sdpa/eager then get a block-diagonal causal mask that transformers derives from the position-id
resets; flash_attention_2 runs its varlen kernel on the batch's own `cu_seqlens` (`varlen_kwargs`;
it would otherwise derive them from the position ids in every layer). So packed rows are correct on CPU
too (tests/test_loss.py compares a packed row with its sequences run one by one); sdpa just pays
O(T²) mask memory per row.
"""
from __future__ import annotations

import dataclasses
import logging
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import kernels
from kernels import LossSpec
from kernels import losses as _losses

from .model_source import output_logit_scale
from .types import MicroBatch

logger = logging.getLogger(__name__)

__all__ = ["LossConfig", "LossSpec", "AWSFT", "advantage_weighted_sft_loss", "micro_batch_loss", "register_loss_forward",
           "hidden_states_and_loss"]

_LOSS_METHOD = "atropos_loss_forward"


NORMALIZATIONS = ("token_mean", "constant", "seq_mean_token_mean")
AWSFT = LossSpec(loss_type="awsft")
"""The spec `advantage_weighted_sft_loss` uses when given none."""


@dataclass(frozen=True)
class LossConfig(kernels.LossSpec):
    """The config section `loss.*`: every kernel setting of `kernels.LossSpec` (one default and one
    check each, there) plus the trainer's choice of the divisor Z."""

    normalization: str = "token_mean"
    """Divisor of the summed token losses: "token_mean" (the batch's trained-token count, over all
    micro-batches and ranks), "constant" (Dr. GRPO, Liu et al. 2025: `constant_normalizer`, a fixed
    token budget, so long and short batches weigh the same per token), "seq_mean_token_mean"
    (each sequence's token mean, averaged over the batch's sequences)."""
    constant_normalizer: Optional[float] = None
    """The fixed divisor of normalization="constant", e.g. sequences per batch × max tokens."""

    def check(self) -> None:
        try:
            super().check()
        except ValueError as e:
            raise ValueError(f"loss.{e}") from None
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"loss.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization == "constant" and not (self.constant_normalizer or 0) > 0:
            raise ValueError("loss.normalization='constant' needs loss.constant_normalizer > 0 (Dr. GRPO's "
                             "fixed token budget, e.g. sequences per batch × max tokens)")

    def normalizer(self, total_trained_tokens: float, num_sequences: int) -> float:
        """The global divisor Z of the summed (weighted) token losses of one batch."""
        if self.normalization == "constant":
            return float(self.constant_normalizer)
        if self.normalization == "seq_mean_token_mean":
            return float(max(num_sequences, 1))
        return float(max(total_trained_tokens, 1))


def _loss_forward(self, input_ids, attention_mask, position_ids, loss_fn, **attn_kwargs):
    """Base model → last hidden state `(R, T, D)` → `loss_fn(hidden, lm_head_weight)`.

    Bound to the model as `atropos_loss_forward`; under FSDP2 registered as a forward method.
    `attn_kwargs`: the varlen boundaries of packed rows (`varlen_kwargs`), passed to the attention.
    """
    base = self.get_decoder()
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
               **attn_kwargs)
    hidden = out.last_hidden_state
    scale = getattr(self, "_atropos_logit_scale", 1.0)
    if scale != 1.0:  # the model's logits are scale · (h @ W.T): Cohere's logit_scale, Granite's 1/logits_scaling
        hidden = hidden * scale
    result = loss_fn(hidden, self.get_output_embeddings().weight)
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
    # Plain attributes (not a Module/Parameter): invisible to state_dict and to parameters().
    object.__setattr__(model, _LOSS_METHOD, types.MethodType(_loss_forward, model))
    config = getattr(model, "config", None)
    object.__setattr__(model, "_atropos_logit_scale", output_logit_scale(config.to_dict()) if config is not None else 1.0)
    register_fsdp_forward_method(model, _LOSS_METHOD)  # no-op when not an FSDPModule
    object.__setattr__(model, "_atropos_loss_registered", isinstance(model, FSDPModule))


def hidden_states_and_loss(model: nn.Module, input_ids, attention_mask, position_ids,
                           loss_fn: Callable[[torch.Tensor, torch.Tensor], object], **attn_kwargs):
    """Run `loss_fn(last_hidden (R,T,D), output_embedding_weight (V,D))` inside the model's forward."""
    register_loss_forward(model)
    return getattr(model, _LOSS_METHOD)(input_ids, attention_mask, position_ids, loss_fn, **attn_kwargs)


def varlen_kwargs(model: nn.Module, mb: MicroBatch) -> dict:
    """The packed row's sequence boundaries as transformers' flash-attention kwargs
    (`cu_seq_lens_q/k`, `max_length_q/k`), or {} where the attention would not use them: padded
    rows, and sdpa/eager, which build their block-diagonal mask from `position_ids`. Without them
    flash_attention_2 re-derives the same boundaries from `position_ids` in every layer (a
    `nonzero` and a max: host syncs per layer). `max_seqlen` must be known on the host (set where
    the micro-batch is built, or derived from a CPU `cu_seqlens`, `MicroBatch`): reading it off a
    device `cu_seqlens` here would be a host sync per micro-batch, so a packed micro-batch without
    it is an error."""
    from transformers.utils.generic import is_flash_attention_requested

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if mb.layout != "packed" or mb.cu_seqlens is None \
            or not is_flash_attention_requested(requested_attention_implementation=impl):
        return {}
    longest = mb.max_seqlen
    if longest <= 0:
        raise ValueError(f"a packed MicroBatch needs max_seqlen (its longest sequence, a host int) for "
                         f"{impl}'s varlen kernel; build it with max_seqlen=..., or with cu_seqlens on the CPU "
                         f"(then it is derived)")
    cu = mb.cu_seqlens.to(mb.input_ids.device, torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _flat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.reshape(-1)


def advantage_weighted_sft_loss(model: nn.Module, input_ids: torch.Tensor, advantages: torch.Tensor,
                                loss_mask: torch.Tensor, spec: LossSpec = AWSFT, *,
                                attention_mask: Optional[torch.Tensor] = None, normalizer: Optional[float] = None,
                                old_logprobs: Optional[torch.Tensor] = None,
                                ref_logprobs: Optional[torch.Tensor] = None):
    """Advantage-weighted token loss of any HF causal LM on UNSHIFTED Atropos rows, no full logits.

    Alignment (Atropos convention): `loss_mask[b, t]`, `advantages[b, t]` (and `old_logprobs` /
    `ref_logprobs`) belong to token `input_ids[b, t]`, which the model predicts
    from position t-1. So the hidden state at t-1 is scored against token t with the mask and
    advantage of t; entries at t = 0 are never used (nothing predicts the first token).

    Args:
        model: a HF causal LM (Qwen2, Llama, ...; tied or untied head), optionally FSDP2-sharded.
        input_ids: `(B, T)` int64.
        advantages: `(B, T)` per-token, or `(B,)` per-sequence (broadcast over tokens).
        loss_mask: `(B, T)` 1/0 (or bool): 1 where token t is trained.
        attention_mask: `(B, T)` 1 on real tokens; padded positions are also removed from the loss.
        spec: the loss settings (`kernels.LossSpec`); default `AWSFT`, the spec's defaults with
            loss_type "awsft".
        normalizer: divisor of the summed token losses; default = number of trained tokens.
        old_logprobs, ref_logprobs: `(B, T)`, for the ratio and the KL term.
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
                    ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be ({B}, {T}) like input_ids, got {tuple(t.shape)}")
    mask = loss_mask.float()
    if attention_mask is not None:
        mask = mask * (attention_mask != 0).float()
    extra = {k: v[:, 1:].reshape(-1).float() if v is not None else None
             for k, v in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs))}
    targets = input_ids[:, 1:].reshape(-1)
    adv = advantages[:, 1:].reshape(-1).float()
    m = mask[:, 1:].reshape(-1)

    def loss_fn(hidden, weight):
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return kernels.fused_linear_policy_loss(h, weight, targets, adv, m, spec, normalizer=normalizer, **extra)

    loss, stats = hidden_states_and_loss(model, input_ids, attention_mask, None, loss_fn)
    stats["logprobs"] = stats["logprobs"].view(B, T - 1)
    return loss, stats


_warned: set = set()


def _per_sequence_mean_weights(mask: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """`mask / n_i`: each trained token weighs 1/(its sequence's trained-token count)."""
    sel = mask != 0
    _, inv = torch.unique(torch.where(sel, seq, torch.full_like(seq, -1)), return_inverse=True)
    counts = torch.zeros(int(inv.max()) + 1 if inv.numel() else 1, device=mask.device).index_add_(0, inv, sel.float())
    return torch.where(sel, mask / counts[inv].clamp(min=1), torch.zeros_like(mask))


def micro_batch_loss(model: nn.Module, mb: MicroBatch, cfg: LossConfig, normalizer: float,
                     num_selected: Optional[int] = None):
    """Loss of one already-shifted `MicroBatch`, divided by `normalizer` (`LossConfig.normalizer`
    of the whole batch: global over micro-batches and ranks).

    `num_selected`: `mb.num_trained_tokens`, counted by the caller while the batch was still on the
    host. With it, on CUDA, the kernel call has no host sync: the batch was validated by
    `atropos_core.data`, so the kernel skips its own re-validation there (on CPU it still checks:
    free there).

    Behaviour policy: `mb.old_logprobs` (the sampler's, where `mb.behaviour_mask`) feed
    `cfg.is_mode`; with "none" they are the PPO old policy instead. Per-token temperature:
    `mb.temperature` where > 0, else `cfg.temperature`. Distillation: `mb.distill_ids` rows >= 0.

    Padded layout: the model gets `attention_mask` and `position_ids`. Packed layout: only
    `position_ids` (see the module docstring). Returns `(loss, stats)`; stats are detached 0-dim
    tensors (sums, so micro-batches and ranks add up without a host sync): `tokens`, `entropy_sum`,
    `clip_sum`, `logprob_sum`, `kl_sum` with `ref_logprobs`, the mismatch and IS sums with
    behaviour logprobs (`logprob_diff_sum`, `mismatch_k3_sum`, `behaviour_tokens`, `is_*`; and
    `is_weight_max`, a maximum), the distillation sums (`distill_*`).
    """
    if mb.layout not in ("padded", "packed"):
        raise ValueError(f"MicroBatch.layout must be 'padded' or 'packed', got {mb.layout!r}")
    mask = mb.loss_mask.reshape(-1).float()
    targets = mb.targets.reshape(-1)
    adv = mb.advantages.reshape(-1).float()
    old, ref = _flat(mb.old_logprobs), _flat(mb.ref_logprobs)
    old = old.float() if old is not None else None
    ref = ref.float() if ref is not None else None
    bmask = _flat(mb.behaviour_mask) if old is not None else None
    if old is not None and bmask is None:  # a caller's MicroBatch: every position has one
        bmask = torch.ones_like(mask, dtype=torch.bool)
    seq = _flat(mb.sequence_ids)
    use_ref = cfg.kl_coef > 0
    spec = cfg  # a LossConfig is the kernel's LossSpec (plus the normaliser choice)
    extra = {}
    if old is not None:  # the behaviour policy: cfg.is_mode applies
        extra.update(behaviour_logprobs=old, behaviour_mask=bmask)
        if cfg.is_mode == "none" and cfg.loss_type != "awsft":
            extra["old_logprobs"] = old
    needs_seq = cfg.loss_type == "gspo" or (old is not None and cfg.is_mode in _losses.SEQ_IS_MODES) \
        or cfg.normalization == "seq_mean_token_mean"
    if needs_seq and seq is None:
        raise ValueError(f"loss_type {cfg.loss_type!r} / is_mode {cfg.is_mode!r} / normalization "
                         f"{cfg.normalization!r} need MicroBatch.sequence_ids")
    if seq is not None and (needs_seq or (old is not None and cfg.is_mode != "none")):
        extra["sequence_ids"] = seq  # token modes: only for the per-sequence statistics
    if mb.temperature is not None:
        t = _flat(mb.temperature).float()
        extra["temperature"] = torch.where(t > 0, t, torch.full_like(t, cfg.temperature))
    if cfg.distill_coef > 0 and mb.distill_ids is not None:
        k = mb.distill_ids.shape[-1]
        ids = mb.distill_ids.reshape(-1, k)
        dmask = ids[:, 0] >= 0
        extra.update(distill_ids=ids.clamp(min=0), distill_logprobs=mb.distill_logprobs.reshape(-1, k).float(),
                     distill_mask=dmask)
    elif cfg.loss_type == "distill":
        if "distill" not in _warned:
            logger.warning("loss.loss_type='distill' but a micro-batch has no distill_token_ids: it trains nothing")
            _warned.add("distill")
        spec = dataclasses.replace(cfg, loss_type="awsft")
        adv = torch.zeros_like(adv)
    if cfg.normalization == "seq_mean_token_mean":
        mask = _per_sequence_mean_weights(mask, seq)

    def loss_fn(hidden, weight):
        h = hidden.reshape(-1, hidden.shape[-1])
        return kernels.fused_linear_policy_loss(
            h, weight, targets, adv, mask, spec, ref_logprobs=ref if use_ref else None, normalizer=normalizer,
            validate=h.device.type != "cuda", num_selected=num_selected, **extra)

    attn = mb.attention_mask if mb.layout == "padded" else None
    loss, st = hidden_states_and_loss(model, mb.input_ids, attn, mb.position_ids, loss_fn, **varlen_kwargs(model, mb))
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
        stats["logprob_diff_sum"] = st["mismatch_abs_sum"]
        stats["mismatch_k3_sum"] = st["mismatch_k3_sum"]
        stats["behaviour_tokens"] = st["behaviour_tokens"]
    for k in ("is_weight_sum", "is_truncated_tokens", "is_masked_tokens", "is_sequences", "is_flagged_sequences",
              "is_weight_max", "distill_kl_sum", "distill_top1_sum", "distill_tokens"):
        if k in st:
            stats[k] = st[k]
    return loss, stats
