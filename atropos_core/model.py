"""Load the policy (HF causal LM + tokenizer), shard it with FSDP2, build AdamW and the LR schedule.

Design:
- Master weights stay in `ModelConfig.dtype` (fp32 by default). Under FSDP2 on CUDA the mixed
  precision policy all-gathers bf16 parameters for compute and reduces gradients in fp32, so the
  optimizer always sees fp32 shards. On CPU (gloo) everything stays fp32: gloo and CPU matmuls gain
  nothing from bf16, and tests compare FSDP against one process at fp32 tolerance.
- `fully_shard` goes on each decoder layer, then on the root. The root group therefore owns the
  input embedding, the final norm and the LM head; a tied LM head is ONE parameter in that group,
  so it stays tied after sharding (`apply_fsdp` checks it and raises otherwise).
- The root does not reshard after forward (FSDP2's default for the root), so the fused loss in
  `atropos_core.loss` runs inside a method registered with `register_fsdp_forward_method`: FSDP
  all-gathers the root group (embedding + LM head) around it exactly as around `forward`, and
  reduce-scatters the LM-head gradient into the sharded parameter after backward.
- Gradient reduction SUMS over ranks (`set_gradient_divide_factor(1.0)`): every micro-batch loss
  is already divided by the GLOBAL trained-token count, so summing gives the gradient of the
  global mean, independent of how tokens were split across ranks and micro-batches.
- One plain process on CPU (no process group, see `atropos_core.dist`) is left unsharded; one
  plain process on CUDA gets a one-rank group there, so FSDP2 (one shard: the whole model) brings
  the same bf16-compute / fp32-master mixed precision as a multi-GPU run.
- Attention: "auto" picks flash_attention_2 only where it can run (CUDA, compute capability >= 8.0,
  `flash_attn` importable, a 16-bit compute dtype: the model's own dtype, or bf16 from FSDP mixed
  precision); sdpa otherwise. An explicit flash_attention_2 where it cannot run is a clear error.
  Packed rows reach either through `atropos_core.loss`: sdpa builds its block-diagonal mask from
  the position ids, flash_attention_2 gets the batch's `cu_seqlens` (`loss.varlen_kwargs`).
- Every rank loads the full checkpoint on CPU before sharding: simple, and fine up to a few B
  parameters per node; meta-device init + broadcast from rank 0 is the step up for larger models.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from . import dist as adist
from .checks import Between, Ge, Gt, OneOf, check_fields
from .model_source import head_transform_error, output_head_transforms, output_logit_scale

logger = logging.getLogger(__name__)

__all__ = ["ModelConfig", "OptimConfig", "load_model_and_tokenizer", "apply_fsdp", "build_optimizer",
           "resolve_attn_implementation", "compute_dtype", "flash_attn_blocker", "lr_lambda", "output_embedding_weight", "unwrap_param"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTN = ("auto", "flash_attention_2", "sdpa", "eager")


@dataclass
class ModelConfig:
    """Which policy to load and how to run it."""

    path: str = ""
    """Local directory of a HF causal LM (config.json + safetensors + tokenizer). No hub downloads."""
    dtype: Annotated[str, OneOf(_DTYPES)] = "float32"
    """Master-weight dtype: "float32" (recommended; bf16 compute comes from FSDP mixed precision on
    CUDA), "bfloat16" or "float16" (pure low-precision training, no fp32 master copy)."""
    attn_implementation: Annotated[str, OneOf(_ATTN)] = "auto"
    """"auto" → flash_attention_2 when on CUDA and `flash_attn` imports, else sdpa; or explicit
    "flash_attention_2" | "sdpa" | "eager"."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~30% more compute)."""
    mixed_precision: bool = True
    """Under FSDP2 on CUDA: bf16 parameters for compute, fp32 gradient reduction. Ignored on CPU."""
    trust_remote_code: bool = False
    """Passed to transformers; keep False unless the model directory needs custom code."""

    def __post_init__(self):
        check_fields(self, "model")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def compute_dtype(cfg: "ModelConfig", device: torch.device) -> torch.dtype:
    """The dtype the forward pass computes in: the master dtype, or bf16 where FSDP2's mixed
    precision applies (CUDA with `mixed_precision`, fp32 masters; `atropos_core.dist` gives a
    plain CUDA process a one-rank group so that it does)."""
    if device.type == "cuda" and cfg.mixed_precision and cfg.torch_dtype == torch.float32:
        return torch.bfloat16
    return cfg.torch_dtype


def flash_attn_blocker(device_type: str, dtype: torch.dtype, capability, flash_importable: bool):
    """Why flash_attention_2 cannot run here (a sentence), or None when it can. Pure: the facts
    (`capability` as (major, minor) or None, whether `flash_attn` imports) are passed in."""
    if device_type != "cuda":
        return f"it needs a CUDA device (this run is on {device_type})"
    if capability is None or tuple(capability) < (8, 0):
        return f"it needs compute capability >= 8.0 (Ampere or newer), this GPU has {capability}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it computes in bf16/fp16 only, and this run computes in {dtype} (model.dtype / mixed_precision)"
    if not flash_importable:
        return "the flash_attn package is not installed (pip install flash-attn, the 'flash' extra)"
    return None


def resolve_attn_implementation(choice: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """"auto" → flash_attention_2 where it can run (`flash_attn_blocker`), else sdpa. `dtype` is the
    compute dtype (`compute_dtype`)."""
    def facts():
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        try:
            import flash_attn  # noqa: F401
            ok = True
        except ImportError:
            ok = False
        return cap, ok

    if choice not in ("auto", "flash_attention_2"):
        return choice
    blocker = flash_attn_blocker(device.type, dtype, *facts())
    if choice == "flash_attention_2":
        if blocker:
            raise ValueError(f"model.attn_implementation='flash_attention_2' cannot run here: {blocker}")
        return choice
    if blocker and device.type == "cuda":
        logger.info("attention: sdpa (flash_attention_2 not used: %s)", blocker)
    return "flash_attention_2" if blocker is None else "sdpa"


def load_model_and_tokenizer(cfg: ModelConfig, device: torch.device):
    """Load the causal LM and its tokenizer from `cfg.path`.

    With more than one rank the model is returned on CPU (`apply_fsdp` moves only each rank's
    shards to `device`); at world size 1 it is moved to `device`. Returns `(model, tokenizer)`; the model is in
    train mode (dropout of the HF configs we target is 0).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.path:
        raise ValueError("model.path is empty: give a local HF model directory")
    attn = resolve_attn_implementation(cfg.attn_implementation, device, compute_dtype(cfg, device))
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=cfg.torch_dtype, attn_implementation=attn,
                                                 trust_remote_code=cfg.trust_remote_code)
    head, config = model.get_output_embeddings(), model.config.to_dict()
    transforms = output_head_transforms(config, {"lm_head.bias"} if getattr(head, "bias", None) is not None else set())
    if transforms:  # the launcher refuses these from config.json; a model loaded another way meets it here
        raise ValueError(head_transform_error(cfg.path, transforms))
    scale = output_logit_scale(config)
    if scale != 1.0:
        check_logit_scale(model, scale, cfg.path)
    tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adist.world_size() == 1:
        model.to(device)  # nothing to shard across; `apply_fsdp` on a 1-rank group still works
    model.train()
    n = sum(p.numel() for p in model.parameters())
    logger.info("loaded %s: %.1fM params, dtype %s, attn %s, tied=%s", cfg.path, n / 1e6, cfg.dtype, attn,
                _is_tied(model))
    return model, tok


def check_logit_scale(model: nn.Module, scale: float, where: str) -> None:
    """Check, on a 16-token probe, that the model's logits are `scale · (hidden @ W.T)`, as the loss
    will compute them (`loss._loss_forward`); raise ValueError naming both when they are not."""
    head = model.get_output_embeddings()
    ids = torch.tensor([[(37 * i + 5) % max(2, head.weight.shape[0]) for i in range(16)]], device=head.weight.device)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        mine = ((model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state * scale) @ head.weight.T).float()
    err = (full - mine).abs().max().item()
    tol = (1e-3 if head.weight.dtype == torch.float32 else 0.05) * max(1.0, full.abs().max().item())
    logger.info("logit scale %g from the model's config: the loss scales the hidden state (probe max |diff| %.2e)",
                scale, err)
    if not err <= tol:
        raise ValueError(f"model {where}: its config gives a logit scale of {scale:g}, but its logits are not "
                         f"{scale:g} · (hidden @ lm_head.weight.T) (max |diff| {err:.3g} on a probe): its forward "
                         f"does something to the logits the fused losses do not; not supported")


def _is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _decoder_layers(model: nn.Module):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` found to shard (Qwen2/Llama layout expected)")
    return layers


def apply_fsdp(model: nn.Module, device: torch.device, *, mixed_precision: bool = True, mesh=None) -> nn.Module:
    """Shard `model` with FSDP2: `fully_shard` each decoder layer, then the root.

    No-op (returns `model` unchanged) when no process group exists. `mesh` defaults to a 1-D mesh
    over all ranks. Mixed precision (bf16 params, fp32 reduce) only on CUDA when `mixed_precision`.
    Raises if tied input/output embeddings came out untied.
    """
    if not adist.is_dist():
        logger.info("apply_fsdp: no process group: model stays unsharded")
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tied = _is_tied(model)
    if mesh is None:
        mesh = init_device_mesh(device.type, (adist.world_size(),))
    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            # Sum, not mean, over ranks: losses are already divided by the global token count.
            m.set_gradient_divide_factor(1.0)
            if device.type != "cuda":
                # gloo has no PREMUL_SUM: ask for plain SUM collectives (factor 1 needs no scaling).
                m.set_force_sum_reduction_for_comms(True)
    if tied and not _is_tied(model):
        raise RuntimeError("apply_fsdp: tied embeddings became two parameters after fully_shard")
    from .loss import register_loss_forward

    register_loss_forward(model)
    logger.info("apply_fsdp: %d ranks, mixed precision %s, tied=%s", adist.world_size(),
                mp.param_dtype or "off", tied)
    return model


def unwrap_param(p: torch.Tensor) -> torch.Tensor:
    """The local tensor of a parameter (the full tensor when unsharded)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def output_embedding_weight(model: nn.Module) -> torch.Tensor:
    """`(V, D)` LM-head weight (the input embedding when tied)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    return head.weight


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: Annotated[float, Gt(0)] = 1e-6
    """Peak learning rate."""
    betas: tuple = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: Annotated[float, Ge(0)] = 0.0
    """Decoupled weight decay, applied to matrices only (not to norms and biases)."""
    eps: Annotated[float, Gt(0)] = 1e-8
    """AdamW epsilon."""
    grad_clip: Annotated[float, Ge(0)] = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still reported)."""
    warmup_steps: Annotated[int, Ge(0)] = 0
    """Linear warm-up from lr/warmup_steps to lr over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """"constant" after warm-up, or "cosine" decay to min_lr_ratio·lr at total_steps."""
    min_lr_ratio: Annotated[float, Between(0.0, 1.0)] = 0.0
    """Final LR as a fraction of lr for the cosine schedule."""
    total_steps: Annotated[int, Ge(1)] = 1000
    """Optimizer steps the schedule spans (cosine reaches its floor here and stays; in a run: `run.steps`)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        check_fields(self, "optim")


def lr_lambda(cfg: OptimConfig):
    """The LR multiplier as a function of the number of optimizer steps taken."""

    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    """AdamW over trainable parameters (no weight decay on 1-D ones) and a LambdaLR schedule.

    Build it AFTER `apply_fsdp`, so the optimizer holds the sharded parameters. Returns
    `(optimizer, scheduler)`.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched
