"""A tiny model distils from a fixed teacher's top-k (loss_type "distill", no reward) and its KL to the
teacher falls; mixed with GRPO it falls too. Real model, real optimizer, the trainer's own step."""
from __future__ import annotations

import pytest
import torch

from atropos_core.loss import LossConfig
from atropos_core.model import ModelConfig, OptimConfig, build_optimizer, load_model_and_tokenizer
from atropos_core.trainer import train_step
from tests.fixtures.batches import make_micro_batch

CPU = torch.device("cpu")


def _teacher_batch(vocab: int, k: int = 4):
    mb = make_micro_batch(3, R=2, T=11, V=vocab)
    g = torch.Generator().manual_seed(42)
    R, T = mb.input_ids.shape
    mb.sequence_ids = torch.arange(R)[:, None].expand(R, T).clone()
    mb.distill_ids = torch.randint(0, vocab, (R, T, k), generator=g)
    mb.distill_logprobs = torch.log_softmax(3 * torch.randn(R, T, k, generator=g), -1)
    mb.old_logprobs = None
    return mb


@pytest.mark.parametrize("mode, loss_type", [("kl", "distill"), ("ce", "distill"), ("kl", "grpo")])
def test_student_kl_to_teacher_falls(tiny_model_dir, mode, loss_type):
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), attn_implementation="sdpa"), CPU)
    vocab = model.get_output_embeddings().weight.shape[0]
    mb = _teacher_batch(vocab)
    cfg = LossConfig(loss_type=loss_type, distill_coef=1.0, distill_mode=mode, backend="torch")
    opt, sched = build_optimizer(model, OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", total_steps=30))
    kls, agree = [], []
    for _ in range(12):
        m = train_step(model, opt, sched, [mb], cfg, global_normalizer=mb.num_trained_tokens, grad_clip=1.0)
        kls.append(m["distill/kl"])
        agree.append(m["distill/top1_agree"])
    assert kls[-1] < 0.5 * kls[0], kls
    assert all(b <= a + 1e-3 for a, b in zip(kls[::3], kls[3::3])), kls    # falls, not just ends low
    assert agree[-1] >= agree[0] and 0 <= agree[-1] <= 1
