"""Off-policy correction, per-token temperature, GSPO and top-k distillation in the fused loss (torch
backend) against the fp64 reference (`kernels.reference`), with both gradients.

Same rule as tests/test_kernels.py: `kernel_err <= 2 * torch_err + atol`. Branch thresholds (IS cap,
mask bands, GSPO clip range) are placed in the middle of the widest gap between the gold values they
split, so a dtype's rounding cannot move a token or a sequence across a boundary and the flagged sets
are exact. Odd shapes: N=37, D=48, V=1000, chunk 8, sequences of 1-7 tokens, 30% of rows masked.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.reference import linear_logprobs_ref, policy_loss_ref
from tests.fixtures.kernel_cases import N, V, assert_rule, call, make_case, run_gold, run_loss

DTYPES = [torch.float32, torch.bfloat16]


def _seq_ids(n, gen):
    ids, s = [], 0
    while len(ids) < n:
        ids += [s] * int(torch.randint(1, 8, (1,), generator=gen))
        s += 1
    return torch.tensor(ids[:n])


def _split(values: torch.Tensor, positive: bool) -> float:
    """A threshold on one side of 0 in the middle of the widest gap between the sorted `values` of
    that side (0 included as an end point), so that some values lie beyond it when any do."""
    v = values.double()
    v = v[v > 0] if positive else -v[v < 0]
    pts = torch.sort(torch.cat([torch.zeros(1, dtype=torch.float64), v.unique()])).values
    if pts.numel() < 2:
        return 0.5 if positive else -0.5
    gaps = pts[1:] - pts[:-1]
    j = int(torch.argmax(gaps))
    t = float((pts[j] + pts[j + 1]) / 2)
    return t if positive else -t


def _offpolicy_case(dtype, seed, temperature=1.0):
    case = make_case(dtype, seed=seed, temperature=temperature)
    gen = torch.Generator().manual_seed(100 + seed)
    gold_logp, _ = linear_logprobs_ref(case["hidden"].double(), case["weight"].double(), case["targets"],
                                       temperature)
    delta = torch.randn(N, generator=gen, dtype=torch.float64) * 0.8
    case["behaviour_logprobs"] = (gold_logp - delta).float()
    case["behaviour_mask"] = torch.rand(N, generator=gen) > 0.15
    case["sequence_ids"] = _seq_ids(N, gen) * 3 + 5          # arbitrary, non-consecutive ids
    case["_delta"] = torch.where(case["behaviour_mask"], delta, torch.zeros_like(delta))
    return case


def _is_thresholds(case, mode):
    m = case["loss_mask"] != 0
    d = case["_delta"][m]
    if mode in ("token_tis", "token_mask"):
        vals = d
    else:
        seq = case["sequence_ids"][m]
        uniq, inv = torch.unique(seq, return_inverse=True)
        S = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, d)
        n = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(d))
        vals = S / n if mode == "geo_mask" else S
    hi, lo = _split(vals, True), _split(vals, False)
    if mode == "geo_mask":
        return dict(geo_low=math.exp(lo), geo_high=math.exp(hi))
    return dict(is_cap=max(1.0, math.exp(hi)), is_low=math.exp(lo), is_high=math.exp(hi))


def _check(case, dtype, kw, chunk=8, terms_scale=None):
    c = {k: v for k, v in case.items() if not k.startswith("_")}
    base = {k: c.pop(k) for k in ("hidden", "weight", "targets", "advantages", "loss_mask")}
    kw = dict(kw)
    use = kw.pop("_use", ())
    kw.update({k: v for k, v in c.items() if k in use})
    loss_k, st_k, gh_k, gw_k = run_loss(kernels.fused_linear_policy_loss, base, backend="torch", chunk_size=chunk, **kw)
    loss_t, st_t, gh_t, gw_t = run_loss(lambda *a, **k: policy_loss_ref(*a, upcast=False, **k), base, **kw)
    loss_g, st_g, gh_g, gw_g = run_gold(base, **kw)
    Z = kw.get("normalizer") or base["loss_mask"].sum().item()
    scale = terms_scale if terms_scale is not None else \
        (base["advantages"].double().abs() * st_g["logprobs"].abs()).sum().item() / Z
    assert_rule("loss", loss_k, loss_t, loss_g, dtype, scale=scale)
    assert_rule("grad_hidden", gh_k, gh_t, gh_g)
    assert_rule("grad_weight", gw_k, gw_t, gw_g)
    assert_rule("logprobs", st_k["logprobs"], st_t["logprobs"], st_g["logprobs"], dtype)
    masked = base["loss_mask"] == 0
    assert masked.any() and (gh_k[masked] == 0).all()
    return st_k, st_g


IS_MODES = ["token_tis", "token_mask", "seq_tis", "seq_mask", "geo_mask"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_is_correction_matches_gold(mode, loss_type, dtype):
    case = _offpolicy_case(dtype, seed=IS_MODES.index(mode))
    kw = dict(loss_type=loss_type, is_mode=mode, kl_coef=0.05, **_is_thresholds(case, mode),
              _use=("behaviour_logprobs", "behaviour_mask", "sequence_ids", "ref_logprobs"))
    st_k, st_g = _check(case, dtype, kw)
    trained = case["loss_mask"] != 0
    # exact flagged sets, and both kinds of token (flagged and not) present
    n_tr, n_ms = st_g["is_truncated"].sum().item(), st_g["is_masked"].sum().item()
    assert st_k["is_truncated_tokens"].item() == n_tr and st_k["is_masked_tokens"].item() == n_ms
    assert 0 < n_tr + n_ms < trained.sum().item(), "thresholds must split the tokens"
    w_g = st_g["is_weight"][trained]
    assert st_k["is_weight_sum"].item() == pytest.approx(w_g.sum().item(), rel=2e-2 if dtype != torch.float32 else 1e-5)
    assert st_k["is_weight_max"].item() == pytest.approx(w_g.max().item(), rel=2e-2 if dtype != torch.float32 else 1e-5)
    # metrics of the mismatch, against the gold logprobs
    bm = case["behaviour_mask"] & trained
    d = torch.where(bm, st_g["logprobs"] - case["behaviour_logprobs"].double(), torch.zeros(N, dtype=torch.float64))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert st_k["mismatch_abs_sum"].item() == pytest.approx(d[trained].abs().sum().item(), rel=tol)
    assert st_k["mismatch_k3_sum"].item() == pytest.approx((d.exp() - d - 1)[trained].sum().item(), rel=tol)
    assert st_k["behaviour_tokens"].item() == bm.sum().item()
    seq = case["sequence_ids"][trained]
    flagged = (st_g["is_truncated"] | st_g["is_masked"])[trained]
    assert st_k["is_flagged_sequences"].item() == len(torch.unique(seq[flagged]))
    assert st_k["is_sequences"].item() == len(torch.unique(seq))


def test_is_none_and_ppo_old_unchanged():
    """is_mode='none' with behaviour logprobs changes nothing but adds the mismatch metrics."""
    case = _offpolicy_case(torch.float32, seed=3)
    base = {k: case[k] for k in ("hidden", "weight", "targets", "advantages", "loss_mask")}
    a = run_loss(kernels.fused_linear_policy_loss, base, backend="torch", loss_type="grpo",
             old_logprobs=case["old_logprobs"])
    b = run_loss(kernels.fused_linear_policy_loss, base, backend="torch", loss_type="grpo",
             old_logprobs=case["old_logprobs"], behaviour_logprobs=case["behaviour_logprobs"])
    assert a[0].item() == b[0].item() and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert "mismatch_k3_sum" in b[1] and "is_weight_sum" not in b[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("loss_type", ["awsft", "grpo", "cispo"])
def test_per_token_temperature(loss_type, dtype):
    gen = torch.Generator().manual_seed(7)
    temp = 0.5 + torch.rand(N, generator=gen)  # 0.5 .. 1.5, one per token
    case = make_case(dtype, seed=11, temperature=temp)
    kw = dict(loss_type=loss_type, temperature=temp, kl_coef=0.1, _use=("old_logprobs", "ref_logprobs")
              if loss_type != "awsft" else ("ref_logprobs",))
    _check(case, dtype, kw)


def test_per_token_temperature_equals_scalar():
    case = make_case(torch.float32, seed=2, temperature=0.7)
    base = {k: case[k] for k in ("hidden", "weight", "targets", "advantages", "loss_mask")}
    a = run_loss(kernels.fused_linear_policy_loss, base, backend="torch", temperature=0.7, chunk_size=8)
    b = run_loss(kernels.fused_linear_policy_loss, base, backend="torch", temperature=torch.full((N,), 0.7), chunk_size=8)
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)
    torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-7)


def _gspo_case(dtype, seed, per_seq_adv=True):
    case = _offpolicy_case(dtype, seed)
    gen = torch.Generator().manual_seed(200 + seed)
    seq = case["sequence_ids"]
    uniq, inv = torch.unique(seq, return_inverse=True)
    if per_seq_adv:
        a = torch.randn(len(uniq), generator=gen)
        case["advantages"] = a[inv]
    # sequence-level log-ratio: the mean of the per-token log-ratios old was built from
    gold_logp, _ = linear_logprobs_ref(case["hidden"].double(), case["weight"].double(), case["targets"])
    lr = gold_logp - case["old_logprobs"].double()
    m = case["loss_mask"] != 0
    S = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv[m], lr[m])
    n = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv[m], torch.ones(int(m.sum()), dtype=torch.float64))
    mean = (S / n.clamp(min=1))[n > 0]
    hi, lo = _split(mean, True), _split(mean, False)
    return case, dict(clip_high=math.exp(hi) - 1, clip_low=1 - math.exp(lo))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("variant", ["plain", "seq_mean_weights", "token_adv_kl", "with_seq_is"])
def test_gspo_matches_gold(variant, dtype):
    case, clip = _gspo_case(dtype, seed=5, per_seq_adv=variant != "token_adv_kl")
    kw = dict(loss_type="gspo", **clip, _use=("old_logprobs", "sequence_ids"))
    if variant == "seq_mean_weights":
        seq = case["sequence_ids"]
        m = case["loss_mask"] != 0
        uniq, inv = torch.unique(seq[m], return_inverse=True)
        cnt = torch.zeros(len(uniq)).index_add_(0, inv, torch.ones(int(m.sum())))
        w = torch.zeros(N)
        w[m] = 1.0 / (cnt[inv] * len(uniq))
        case["loss_mask"] = w
        kw["normalizer"] = 1.0
    if variant == "token_adv_kl":
        kw["kl_coef"] = 0.1
        kw["_use"] += ("ref_logprobs",)
    if variant == "with_seq_is":
        kw.update(is_mode="geo_mask", **_is_thresholds(case, "geo_mask"))
        kw["_use"] += ("behaviour_logprobs", "behaviour_mask")
    st_k, st_g = _check(case, dtype, kw)
    assert st_k["clip_frac"].item() == pytest.approx(st_g["clip_frac"].item(), abs=1e-6)
    assert 0 < st_g["clip_frac"].item() < 1


def test_gspo_runs_two_passes(monkeypatch):
    import kernels as K

    calls = []
    real = K.chunked_loss_and_grads
    monkeypatch.setattr(K, "chunked_loss_and_grads", lambda *a, **k: calls.append(k["need_grad_weight"]) or real(*a, **k))
    case, clip = _gspo_case(torch.float32, seed=1)
    run_loss(K.fused_linear_policy_loss, {k: case[k] for k in ("hidden", "weight", "targets", "advantages", "loss_mask")},
         backend="torch", loss_type="gspo", sequence_ids=case["sequence_ids"], old_logprobs=case["old_logprobs"])
    assert calls == [False, True]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_gspo_token_advantages_varied_lengths(dtype, monkeypatch):
    """GSPO with advantages that differ within a sequence, sequences of 1 to 14 tokens (one spanning
    several chunks, some fully masked), chunk 5; and pass 1 is the logprob-only row pass (row_stats,
    the entropy pass, runs only in pass 2)."""
    case = _offpolicy_case(dtype, seed=9)
    lens = [1, 14, 3, 2, 7, 1, 5, 4]
    ids = torch.cat([torch.full((k,), 10 * i + 3) for i, k in enumerate(lens)])
    case["sequence_ids"] = torch.cat([ids, torch.full((N - ids.numel(),), 999)])
    case["loss_mask"][:1] = 0.0                               # the first 1-token sequence is fully masked
    m = case["loss_mask"] != 0
    seq, adv = case["sequence_ids"], case["advantages"]
    varied = [s for s in seq.unique() if adv[(seq == s) & m].unique().numel() > 1]
    assert len(varied) >= 4 and not m.all() and (~m[1:]).any()
    _, inv = torch.unique(seq, return_inverse=True)
    gold_logp, _ = linear_logprobs_ref(case["hidden"].double(), case["weight"].double(), case["targets"])
    lr = gold_logp - case["old_logprobs"].double()
    S = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv[m], lr[m])
    cnt = torch.zeros_like(S).index_add_(0, inv[m], torch.ones(int(m.sum()), dtype=torch.float64))
    mean = (S / cnt.clamp(min=1))[cnt > 0]
    clip = dict(clip_high=math.exp(_split(mean, True)) - 1, clip_low=1 - math.exp(_split(mean, False)))
    calls = []
    real = kernels.chunked.TorchOps.row_stats
    monkeypatch.setattr(kernels.chunked.TorchOps, "row_stats", staticmethod(lambda *a: calls.append(1) or real(*a)))
    st_k, st_g = _check(case, dtype, dict(loss_type="gspo", **clip, _use=("old_logprobs", "sequence_ids")), chunk=5)
    assert len(calls) == -(-int(m.sum()) // 5)                # pass 2's chunks only
    assert st_k["clip_frac"].item() == pytest.approx(st_g["clip_frac"].item(), abs=1e-6)
    assert 0 < st_g["clip_frac"].item() < 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_logprobs_only_pass_equals_full_pass(dtype):
    """The logprob-only loop (reused chunk buffer, tail chunk, per-row temperature) gives the full
    loop's logprobs, and matches the fp64 reference by the 2*torch_err rule."""
    case = make_case(dtype, seed=4)
    h, w, t = case["hidden"], case["weight"], case["targets"]
    temps = 0.6 + torch.rand(N, generator=torch.Generator().manual_seed(4))
    for temp in (0.8, temps):
        full, ent, _, _ = kernels.chunked_loss_and_grads(h, w, t, lambda r, lp: None, temperature=temp,
                                                         need_grad_hidden=False, need_grad_weight=False, chunk_size=8)
        only, ent2, _, _ = kernels.chunked_loss_and_grads(h, w, t, lambda r, lp: None, temperature=temp,
                                                          need_grad_hidden=False, need_grad_weight=False, chunk_size=8,
                                                          logprobs_only=True)
        assert ent2 is None and ent is not None
        torch.testing.assert_close(only, full, rtol=0, atol=0)
        gold, _ = linear_logprobs_ref(h.double(), w.double(), t, temp.double() if torch.is_tensor(temp) else temp)
        same, _ = linear_logprobs_ref(h, w, t, temp)
        assert_rule("logprobs", only, same, gold, dtype)


def _distill_case(dtype, seed, k=5, temperature=1.0):
    case = make_case(dtype, seed=seed, temperature=temperature)
    gen = torch.Generator().manual_seed(300 + seed)
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(N)])
    ids[::3, 0] = case["targets"][::3]           # the sampled token among the teacher's top-k, sometimes
    t_logits = torch.randn(N, k, generator=gen, dtype=torch.float64) * 2
    t_lp = torch.log_softmax(torch.cat([t_logits, torch.zeros(N, 1, dtype=torch.float64)], 1), 1)[:, :k]
    case["distill_ids"], case["distill_logprobs"] = ids, t_lp.float()
    case["distill_mask"] = torch.rand(N, generator=gen) > 0.2     # some rows without a teacher
    return case


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("mode", ["kl", "ce"])
@pytest.mark.parametrize("mix", ["distill_only", "grpo_mixed", "temp_mixed"])
def test_distill_matches_gold(mix, mode, dtype):
    gen = torch.Generator().manual_seed(9)
    temp = (0.6 + torch.rand(N, generator=gen)) if mix == "temp_mixed" else 1.0
    case = _distill_case(dtype, seed=4, temperature=temp)
    kw = dict(distill_coef=0.7, distill_mode=mode, temperature=temp, _use=("distill_ids", "distill_logprobs", "distill_mask"))
    if mix == "distill_only":
        kw["loss_type"] = "distill"
    else:
        kw.update(loss_type="grpo", _use=kw["_use"] + ("old_logprobs",))
    st_k, st_g = _check(case, dtype, kw, terms_scale=None)
    m = case["loss_mask"] != 0
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert st_k["distill_kl_sum"].item() == pytest.approx(st_g["distill_kl"][m].sum().item(), rel=tol)
    assert st_k["distill_tokens"].item() == (m & case["distill_mask"]).sum().item()
    if dtype == torch.float32:
        assert st_k["distill_top1_sum"].item() == st_g["distill_top1"][m].sum().item()


def test_distill_top1_is_counted():
    """A row whose student argmax is the teacher's top-1 counts; one whose argmax is elsewhere does not."""
    torch.manual_seed(0)
    v, d = 50, 8
    w = torch.randn(v, d)
    h = torch.randn(4, d)
    amax = (h @ w.T).argmax(1)
    other = (amax + 1) % v
    ids = torch.stack([amax, other, (amax + 2) % v], 1)
    t_lp = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 4))
    t_lp[2:] = t_lp[2:, [1, 0, 2]]               # rows 2, 3: the teacher prefers `other`
    _, st = call(kernels.fused_linear_policy_loss, h, w, amax, torch.zeros(4), torch.ones(4), backend="torch",
                                                   loss_type="distill", distill_ids=ids, distill_logprobs=t_lp,
                                                   distill_coef=1.0)
    assert st["distill_top1_sum"].item() == 2.0


def test_new_options_validate():
    case = make_case(torch.float32)
    args = (case["hidden"], case["weight"], case["targets"], case["advantages"], case["loss_mask"])
    with pytest.raises(ValueError, match="sequence_ids"):
        call(kernels.fused_linear_policy_loss, *args, loss_type="gspo")
    with pytest.raises(ValueError, match="is_mode"):
        call(kernels.fused_linear_policy_loss, *args, is_mode="bogus")
    with pytest.raises(ValueError, match="distill"):
        call(kernels.fused_linear_policy_loss, *args, loss_type="distill")
    with pytest.raises(ValueError, match=r"\(37, k\)"):
        call(kernels.fused_linear_policy_loss, *args, distill_ids=torch.zeros(36, 2, dtype=torch.long),
                                               distill_logprobs=torch.zeros(36, 2), distill_coef=1.0)
    with pytest.raises(ValueError, match="target ids"):
        call(kernels.fused_linear_policy_loss, *args, distill_ids=torch.full((N, 2), V), distill_logprobs=torch.zeros(N, 2),
                                               distill_coef=1.0)
    with pytest.raises(ValueError, match="temperature"):
        call(kernels.fused_linear_policy_loss, *args, temperature=torch.zeros(N))
    with pytest.raises(ValueError, match="is_cap"):
        call(kernels.fused_linear_policy_loss, *args, is_mode="token_tis", is_cap=0.5)


@pytest.mark.parametrize("loss_type", ["grpo", "gspo"])
def test_old_logprobs_only_where_behaviour_mask(loss_type):
    """Tokens without a behaviour logprob are on-policy (old = current) in both kernel and gold."""
    case, clip = _gspo_case(torch.float32, seed=6)
    # grpo: make_case's per-token log-ratios sit away from the default 0.2 clip boundaries
    kw = dict(loss_type=loss_type, **(clip if loss_type == "gspo" else {}),
              _use=("old_logprobs", "behaviour_mask", "sequence_ids"))
    assert not case["behaviour_mask"].all()
    _check(case, torch.float32, kw)
