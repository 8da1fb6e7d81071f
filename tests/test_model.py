"""Model loading, attention choice, optimizer groups and the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch

from atropos_core.model import (ModelConfig, OptimConfig, apply_fsdp, build_optimizer, load_model_and_tokenizer,
                                lr_lambda, resolve_attn_implementation)

CPU = torch.device("cpu")


def test_attn_auto_is_sdpa_on_cpu_and_flash_refused():
    assert resolve_attn_implementation("auto", CPU) == "sdpa"
    assert resolve_attn_implementation("eager", CPU) == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        resolve_attn_implementation("flash_attention_2", CPU)


def test_load_tied_and_untied(tiny_model_dir, tiny_tied_model_dir):
    m, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_tied_model_dir)), CPU)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.training and m.dtype == torch.float32
    assert tok.decode(tok("say red :")["input_ids"]) == "say red :"
    # No process group: apply_fsdp leaves the model as is.
    assert apply_fsdp(m, CPU) is m
    u, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"), CPU)
    assert u.lm_head.weight is not u.model.embed_tokens.weight and u.dtype == torch.bfloat16


def test_optimizer_groups_each_param_once_no_decay_on_vectors(tiny_tied_model_dir):
    m, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_tied_model_dir)), CPU)
    opt, _ = build_optimizer(m, OptimConfig(lr=1e-4, weight_decay=0.1))
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_lr_schedule_warmup_constant_and_cosine():
    const = lr_lambda(OptimConfig(lr=1.0, warmup_steps=4, schedule="constant"))
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=12, min_lr_ratio=0.1)
    cos = lr_lambda(cfg)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(12) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    vals = [cos(s) for s in range(2, 13)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_scheduler_drives_optimizer_lr(tiny_model_dir):
    m, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), CPU)
    opt, sched = build_optimizer(m, OptimConfig(lr=2e-3, warmup_steps=2))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("field,kwargs", [
    ("optim.lr", {"lr": 0.0}), ("optim.betas", {"betas": (0.9, 1.0)}), ("optim.schedule", {"schedule": "linear"}),
    ("optim.min_lr_ratio", {"min_lr_ratio": 1.5}), ("optim.warmup_steps", {"warmup_steps": -1}),
    ("optim.grad_clip", {"grad_clip": -1.0}), ("optim.total_steps", {"total_steps": 0}),
])
def test_optim_config_validation_names_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)


def test_model_config_validation():
    with pytest.raises(ValueError, match="model.dtype"):
        ModelConfig(path="x", dtype="fp8")
    with pytest.raises(ValueError, match="model.attn_implementation"):
        ModelConfig(path="x", attn_implementation="flash")
    with pytest.raises(ValueError, match="model.path"):
        load_model_and_tokenizer(ModelConfig(), CPU)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from atropos_core.loss import LossSpec, advantage_weighted_sft_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 10), generator=g)
    adv, mask = torch.randn(2, 10, generator=g), torch.ones(2, 10)
    grads = []
    for ckpt in (False, True):
        m, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=ckpt), CPU)
        assert m.is_gradient_checkpointing == ckpt
        loss, _ = advantage_weighted_sft_loss(m, ids, adv, mask, LossSpec(loss_type="awsft", backend="torch"))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


def test_flash_attn_chosen_only_where_it_can_run():
    """The selection logic of issue #15 (item 2), on the facts a GPU node would present."""
    from atropos_core.model import compute_dtype, flash_attn_blocker

    bf16, fp32 = torch.bfloat16, torch.float32
    assert flash_attn_blocker("cuda", bf16, (9, 0), True) is None          # H100/H200, bf16
    assert flash_attn_blocker("cuda", torch.float16, (8, 0), True) is None  # A100, fp16
    assert "CUDA" in flash_attn_blocker("cpu", bf16, None, True)
    assert "capability" in flash_attn_blocker("cuda", bf16, (7, 5), True)   # T4
    assert "fp32" in flash_attn_blocker("cuda", fp32, (9, 0), True).replace("float32", "fp32")
    assert "flash_attn" in flash_attn_blocker("cuda", bf16, (9, 0), False)
    # Compute dtype: fp32 masters on CUDA compute in bf16 (FSDP mixed precision, also on one GPU).
    cuda = torch.device("cuda", 0)
    assert compute_dtype(ModelConfig(), cuda) == bf16
    assert compute_dtype(ModelConfig(mixed_precision=False), cuda) == fp32
    assert compute_dtype(ModelConfig(dtype="float16"), cuda) == torch.float16
    assert compute_dtype(ModelConfig(), CPU) == fp32
    # On this (CPU) machine: auto is sdpa, an explicit flash request names the reason.
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_attn_implementation("flash_attention_2", CPU, bf16)
    assert resolve_attn_implementation("auto", CPU, bf16) == "sdpa"


def test_packed_cu_seqlens_reach_a_varlen_attention(tiny_model_dir):
    """Under a flash-style attention the packed row's `cu_seqlens` travel from the batch through
    `micro_batch_loss` and the decoder to every attention call, and a varlen attention that uses
    only them gives the loss and gradients of the same sequences as padded rows under sdpa.
    The varlen attention here is causal sdpa per `cu_seq_lens_q` segment (flash-attention needs
    CUDA); the mask function is transformers' own flash one."""
    import random

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from atropos_core.data import DataConfig, build_train_batch
    from atropos_core.loss import LossConfig, micro_batch_loss
    from tests.fixtures.atropos_api import make_group

    seen = []

    def varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        assert attention_mask is None
        cu = kw["cu_seq_lens_q"]
        assert torch.equal(cu, kw["cu_seq_lens_k"]) and kw["max_length_q"] == int(cu.diff().max())
        seen.append(cu.tolist())
        rep = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        out = torch.empty_like(query)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            out[:, :, a:b] = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    name = "flash_varlen_sdpa_test"
    AttentionInterface.register(name, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), CPU)
    vocab = model.config.vocab_size
    groups = [make_group(random.Random(5), n=3, vocab=vocab)]
    cfg = LossConfig(loss_type="awsft", backend="torch")
    results = {}
    for layout in ("padded", "packed"):
        model.config._attn_implementation = name if layout == "packed" else "sdpa"
        tb = build_train_batch(groups, DataConfig(max_token_len=64, vocab_size=vocab, layout=layout,
                                                  max_tokens_per_micro_batch=4096))
        assert len(tb.micro_batches) == 1
        model.zero_grad(set_to_none=True)
        loss, _ = micro_batch_loss(model, tb.micro_batches[0], cfg, normalizer=float(tb.total_trained_tokens))
        loss.backward()
        results[layout] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.config._attn_implementation = "sdpa"
    packed_cu = tb.micro_batches[0].cu_seqlens.tolist()
    assert len(packed_cu) == 4 and seen and all(c == packed_cu for c in seen)
    assert len(seen) == model.config.num_hidden_layers
    torch.testing.assert_close(results["packed"][0], results["padded"][0], rtol=1e-5, atol=1e-6)
    for n, g in results["padded"][1].items():
        torch.testing.assert_close(results["packed"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
