"""The fused loss path through a real HF model equals a naive full-logits loss, value and gradients.

The naive side runs `model(...).logits` (the LM head, full `[B, T, V]` logits) and feeds them to
the one reference, `kernels.reference.policy_loss_ref`, as `hidden=logits, weight=I_V` (so the
reference's matmul is the identity and the loss formulas are not copied here), in float64.
"""
from __future__ import annotations

import pytest
import torch

from atropos_core.loss import LossConfig, advantage_weighted_sft_loss, micro_batch_loss
from kernels import LossSpec
from atropos_core.model import ModelConfig, load_model_and_tokenizer
from atropos_core.types import MicroBatch
from kernels.reference import policy_loss_ref
from tests.fixtures.models import save_with_tokenizer

CPU = torch.device("cpu")


def _tiny_llama_dir(root, tokenizer_dir):
    """A random tiny Llama-family model (the second family the trainer must take), with the
    tiny Qwen2's tokenizer files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return save_with_tokenizer(LlamaForCausalLM(cfg), root, tokenizer_dir)


def _tiny_scaled_dir(root, tokenizer_dir, family: str):
    """A random tiny model whose forward scales its logits: Cohere (`logits * logit_scale`, tied) or
    Granite (`logits / logits_scaling`)."""
    import transformers as tf

    torch.manual_seed(1)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128)
    model = (tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.25)) if family == "cohere" else
             tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=3.0, tie_word_embeddings=False)))
    return save_with_tokenizer(model, root, tokenizer_dir)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_tied_model_dir, tmp_path_factory):
    out = {}
    llama = _tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), tiny_model_dir)
    cohere = _tiny_scaled_dir(tmp_path_factory.mktemp("tiny_cohere"), tiny_model_dir, "cohere")
    granite = _tiny_scaled_dir(tmp_path_factory.mktemp("tiny_granite"), tiny_model_dir, "granite")
    for name, d in (("untied", tiny_model_dir), ("tied", tiny_tied_model_dir), ("llama", llama), ("cohere", cohere),
                    ("granite", granite)):
        model, _ = load_model_and_tokenizer(ModelConfig(path=str(d), attn_implementation="sdpa"), CPU)
        out[name] = model
    return out


def _rows(seed, B=3, T=13, V=500):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.35).float()
    attn = torch.ones(B, T, dtype=torch.int64)
    attn[1, 9:] = 0      # a right-padded row
    mask[2] = 0          # a fully masked row
    old = -torch.rand(B, T, generator=g) * 6.0
    ref = -torch.rand(B, T, generator=g) * 6.0
    return ids, adv, mask, attn, old, ref


def _naive(model, ids, adv, mask, attn, normalizer=None, **kw):
    """Full logits through the LM head, Atropos alignment written out: token t from position t-1."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    V = logits.shape[-1]
    m = (mask * (attn != 0).float())[:, 1:].reshape(-1)
    shift = {k: (v[:, 1:].reshape(-1) if v is not None else None) for k, v in kw.pop("vecs", {}).items()}
    spec = LossSpec(**{"loss_type": "awsft", **kw})
    return policy_loss_ref(logits.reshape(-1, V), torch.eye(V), ids[:, 1:].reshape(-1), adv[:, 1:].reshape(-1), m,
                           spec, normalizer=normalizer, upcast=True, **shift)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["untied", "tied", "llama", "cohere", "granite"])
@pytest.mark.parametrize("loss_type,kl", [("awsft", 0.0), ("grpo", 0.1), ("cispo", 0.0)])
def test_fused_equals_naive_value_and_grads(models, which, loss_type, kl):
    model = models[which]
    ids, adv, mask, attn, old, ref = _rows(1)
    kw = dict(loss_type=loss_type, clip_low=0.2, clip_high=0.28, kl_coef=kl, temperature=0.9)
    vecs = {"old_logprobs": old if loss_type != "awsft" else None, "ref_logprobs": ref if kl > 0 else None}

    model.zero_grad(set_to_none=True)
    loss_n, st_n = _naive(model, ids, adv, mask, attn, normalizer=17.0, vecs=vecs, **kw)
    loss_n.backward()
    g_naive = _grads(model)

    model.zero_grad(set_to_none=True)
    loss_f, st_f = advantage_weighted_sft_loss(model, ids, adv, mask, LossSpec(backend="torch", **kw),
                                               attention_mask=attn, normalizer=17.0, **vecs)
    loss_f.backward()
    g_fused = _grads(model)

    assert torch.allclose(loss_f.double(), loss_n, rtol=1e-5, atol=1e-6), (loss_f.item(), loss_n.item())
    m = ((mask * attn)[:, 1:] != 0)
    assert torch.allclose(st_f["logprobs"][m].double(), st_n["logprobs"].view(m.shape)[m], atol=1e-5)
    assert torch.allclose(st_f["entropy"].double(), st_n["entropy"], rtol=1e-5)
    assert set(g_fused) == set(g_naive) and len(g_fused) > 0
    for name, gn in g_naive.items():
        scale = gn.abs().max().clamp(min=1e-6)
        err = (g_fused[name] - gn).abs().max() / scale
        assert err < 2e-4, f"{which}/{loss_type}: grad of {name} differs, rel err {err:.2e}"
    if which == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_per_sequence_advantages_broadcast(models):
    model = models["untied"]
    ids, adv, mask, attn, _, _ = _rows(2)
    per_seq = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        spec = LossSpec(loss_type="awsft", backend="torch")
        a, _ = advantage_weighted_sft_loss(model, ids, per_seq, mask, spec, attention_mask=attn)
        b, _ = advantage_weighted_sft_loss(model, ids, per_seq[:, None].expand_as(adv), mask, spec,
                                           attention_mask=attn)
        c, _ = _naive(model, ids, per_seq[:, None].expand_as(adv), mask, attn)
    assert a.item() == b.item()
    assert torch.allclose(a.double(), c, rtol=1e-5, atol=1e-7)


def _shifted(ids, adv, mask, attn):
    """Atropos rows → the shifted MicroBatch layout of atropos_core.types (padded)."""
    B, T = ids.shape
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    lm = torch.zeros(B, T)
    lm[:, :-1] = (mask * attn)[:, 1:]
    a = torch.zeros(B, T)
    a[:, :-1] = adv[:, 1:]
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return MicroBatch(input_ids=ids, targets=targets, loss_mask=lm, advantages=a, attention_mask=attn,
                      position_ids=pos, num_sequences=B)


def test_micro_batch_loss_matches_seed_interface(models):
    model = models["tied"]
    ids, adv, mask, attn, _, _ = _rows(3)
    mb = _shifted(ids, adv, mask, attn)
    cfg = LossConfig(loss_type="awsft", backend="torch")
    with torch.no_grad():
        l1, st1 = micro_batch_loss(model, mb, cfg, normalizer=11.0)
        l2, st2 = advantage_weighted_sft_loss(model, ids, adv, mask, LossSpec(loss_type="awsft", backend="torch"),
                                              attention_mask=attn, normalizer=11.0)
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-7)
    assert st1["tokens"].item() == ((mask * attn)[:, 1:] != 0).sum().item()


def test_packed_row_equals_separate_rows(models):
    """Two sequences packed in one row (position ids restart, no attention mask) give the same
    loss and gradients as the same sequences in padded rows: no attention across the boundary."""
    model = models["untied"]
    g = torch.Generator().manual_seed(4)
    la, lb = 7, 5
    seqs = [torch.randint(0, 500, (n,), generator=g) for n in (la, lb)]
    advs = [torch.randn(n, generator=g) for n in (la, lb)]
    T = la + lb + 2  # two padding slots at the end of the packed row

    ids_p = torch.zeros(1, T, dtype=torch.int64)
    tgt_p = torch.zeros(1, T, dtype=torch.int64)
    lm_p, adv_p = torch.zeros(1, T), torch.zeros(1, T)
    pos_p = torch.zeros(1, T, dtype=torch.int64)
    attn_p = torch.zeros(1, T, dtype=torch.int64)
    o = 0
    for s, a in zip(seqs, advs):
        n = len(s)
        ids_p[0, o:o + n] = s
        tgt_p[0, o:o + n - 1] = s[1:]
        lm_p[0, o:o + n - 1] = 1.0
        adv_p[0, o:o + n - 1] = a[1:]
        pos_p[0, o:o + n] = torch.arange(n)
        attn_p[0, o:o + n] = 1
        o += n
    packed = MicroBatch(input_ids=ids_p, targets=tgt_p, loss_mask=lm_p, advantages=adv_p, attention_mask=attn_p,
                        position_ids=pos_p, layout="packed",
                        cu_seqlens=torch.tensor([0, la, la + lb], dtype=torch.int32),
                        num_sequences=2)
    ids_d = torch.zeros(2, la, dtype=torch.int64)
    adv_d, mask_d = torch.zeros(2, la), torch.zeros(2, la)
    attn_d = torch.zeros(2, la, dtype=torch.int64)
    for i, (s, a) in enumerate(zip(seqs, advs)):
        ids_d[i, :len(s)], adv_d[i, :len(s)], mask_d[i, :len(s)], attn_d[i, :len(s)] = s, a, 1.0, 1
    padded = _shifted(ids_d, adv_d, mask_d, attn_d)
    cfg = LossConfig(loss_type="awsft", backend="torch")

    model.zero_grad(set_to_none=True)
    lp, stp = micro_batch_loss(model, packed, cfg, normalizer=10.0)
    lp.backward()
    gp = _grads(model)
    model.zero_grad(set_to_none=True)
    ld, std = micro_batch_loss(model, padded, cfg, normalizer=10.0)
    ld.backward()
    gd = _grads(model)
    assert stp["tokens"].item() == std["tokens"].item() == la + lb - 2
    assert torch.allclose(lp, ld, rtol=1e-5, atol=1e-6), (lp.item(), ld.item())
    for name in gd:
        assert torch.allclose(gp[name], gd[name], rtol=1e-4, atol=1e-6), name


def test_loss_config_validation_names_field():
    with pytest.raises(ValueError, match="loss_type"):
        LossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="loss.backend"):
        LossConfig(backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        LossConfig(chunk_size=0)


def test_shape_errors_name_the_argument(models):
    ids, adv, mask, attn, _, _ = _rows(5)
    with pytest.raises(ValueError, match="loss_mask"):
        advantage_weighted_sft_loss(models["untied"], ids, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="per-sequence advantages"):
        advantage_weighted_sft_loss(models["untied"], ids, adv[:2, 0], mask)
