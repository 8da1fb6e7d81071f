"""Tests of the Triton backend (`kernels/triton_linear_loss.py`) against the fp64 reference.

Interpreter tests (`interpret`): `TRITON_INTERPRET=1` is read when `@triton.jit` decorates a
kernel, i.e. when `kernels.triton_linear_loss` is first imported, and `kernels.resolve_backend`
reads it on every call. Setting it in this pytest process would change what other test files see
(backend="triton" on CPU must raise there) and would be too late if anyone imported the kernels
first. So this module runs every interpreted computation in ONE subprocess (this file run as a
script: `_worker`), with the variable set before triton is imported and the interpreter's bf16
`tl.dot` and bf16 rounding patched (see `_patch_interpreter_bf16`). The parent builds the inputs, the child
returns the Triton results through a `torch.save` file, and the parent compares them, for the loss
and both gradients, with the rule of tests/fixtures/kernel_cases.py:

    kernel_err <= 2 * torch_err + atol,   errors against the fp64 gold (`upcast=True`),
    torch_err from the same reference in the inputs' dtype (`upcast=False`).

GPU tests (`gpu`) run the compiled kernels in-process at Llama-3 / Qwen-2 vocabularies.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.chunked import TorchOps  # noqa: E402
from kernels.reference import large_logit_inputs, linear_logprobs_ref, policy_loss_ref  # noqa: E402
from tests.fixtures.kernel_cases import call  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Slack per dtype, relative to the gold's scale (max |gold|): about one rounding of each format,
# so that a case where plain torch happens to be exact still has room for the kernel's different
# (equally valid) summation order. Relative, not absolute: gradients are often ~1e-3 in size.
ATOL = {"fp32": 1e-6, "fp16": 2e-4, "bf16": 2e-3}

# Small block configs that force every loop and tail path at the interpreted ops shapes: 4 vocab
# tiles (the last 1000 - 768 wide), 2 token steps (21 = 16 + 5) and a D tail (48 = 32 + 16).
# (The interpreter's cost is programs x loop trips: these are kept few.)
SMALL_ROW = {"BLOCK_V": 256, "num_warps": 4, "num_stages": 2}
SMALL_DW = {"BLOCK_C": 16, "BLOCK_V": 64, "BLOCK_D": 32, "DOT_PRECISION": "ieee", "num_warps": 4, "num_stages": 2}

# ---------------------------------------------------------------------------------------------
# Cases. Each policy-loss case: dtype, shape, loss settings; the parent builds the tensors.

POLICY_CASES = {
    "awsft_fp32": dict(dtype="fp32", loss_type="awsft"),
    "grpo_old_fp32_t07": dict(dtype="fp32", loss_type="grpo", old=True, temperature=0.7),
    "cispo_old_fp32": dict(dtype="fp32", loss_type="cispo", old=True, clip_high=0.1),
    "awsft_kl_fp32": dict(dtype="fp32", loss_type="awsft", kl_coef=0.1, ref=True),
    "grpo_kl_fp16_chunked": dict(dtype="fp16", loss_type="grpo", old=True, kl_coef=0.05, ref=True, chunk_size=16),
    "grpo_old_bf16": dict(dtype="bf16", loss_type="grpo", old=True, temperature=1.3),
    "cispo_kl_bf16_normalizer": dict(dtype="bf16", loss_type="cispo", old=True, kl_coef=0.1, ref=True,
                                     normalizer=123.0),
    "awsft_bf16_two_tiles": dict(dtype="bf16", loss_type="awsft", V=5003, temperature=0.9),
    "awsft_fp32_tiny_odd": dict(dtype="fp32", loss_type="awsft", N=3, D=24, V=33),
    "grpo_fp16_masked_batch": dict(dtype="fp16", loss_type="grpo", old=True, all_masked=True),
    # Off-policy corrections, GSPO, distillation, per-token temperature (kernels/reference.py).
    "gspo_seq_tis_fp32": dict(dtype="fp32", loss_type="gspo", old=True, seq=True, beh=True, is_mode="seq_tis",
                              is_cap=1.5, N=29, V=300),
    "grpo_token_tis_fp32_temps": dict(dtype="fp32", loss_type="grpo", seq=True, beh=True, is_mode="token_tis",
                                      is_cap=1.3, temps=True, N=29, V=300),
    "cispo_token_mask_fp16_chunked": dict(dtype="fp16", loss_type="cispo", beh=True, is_mode="token_mask",
                                          is_low=0.6, is_high=1.6, chunk_size=16, N=29, V=300),
    "grpo_distill_ce_bf16_temps": dict(dtype="bf16", loss_type="grpo", old=True, distill=4, distill_mode="ce",
                                       temps=True, N=29, V=300),
    "distill_only_kl_fp32": dict(dtype="fp32", loss_type="distill", distill=3, distill_mode="kl", N=21, V=257),
    # GSPO with per-token advantages (they differ within a sequence), sequences of 1-9 tokens (the
    # first fully masked), chunks of 16 that split sequences: pass 1 is the logprob-only row pass.
    "gspo_token_adv_varlen_fp32": dict(dtype="fp32", loss_type="gspo", old=True, seq_lens=[1, 9, 3, 2, 6, 1, 4, 3],
                                       mask_first=True, chunk_size=16, N=29, V=300),
}
LOGPROB_CASES = {
    "logprobs_fp32_t07": dict(dtype="fp32", temperature=0.7),
    "logprobs_bf16": dict(dtype="bf16", temperature=1.0, chunk=True),
    "logprobs_fp16_two_tiles": dict(dtype="fp16", temperature=1.1, V=4500),
    # Target logits at |z| ~ 16-32: also checked against fp32-logits torch (test_logp_error_at_large_logits).
    "logprobs_bf16_large_logits_t07": dict(dtype="bf16", temperature=0.7, V=2000, large=True),
}
OPS_DTYPES = ("fp32", "fp16", "bf16")


def _policy_inputs(name, spec):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n, d, v = spec.get("N", 37), spec.get("D", 48), spec.get("V", 1000)
    dt = DTYPES[spec["dtype"]]
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(dt)
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dt)
    targets = torch.randint(0, v, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.4).float()
    if spec.get("all_masked"):
        mask.zero_()
    adv = torch.randn(n, generator=g)
    logp_gold, _ = linear_logprobs_ref(hidden, weight, targets, spec.get("temperature", 1.0))
    kw = dict(loss_type=spec["loss_type"], temperature=spec.get("temperature", 1.0),
              kl_coef=spec.get("kl_coef", 0.0), clip_high=spec.get("clip_high", 0.2),
              normalizer=spec.get("normalizer"))
    # Old/reference logprobs near the current policy's, so ratios fall on both sides of the clip range.
    if spec.get("old"):
        kw["old_logprobs"] = (logp_gold + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    if spec.get("ref"):
        kw["ref_logprobs"] = (logp_gold + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    if spec.get("temps"):
        kw["temperature"] = 0.6 + torch.rand(n, generator=g)
    if spec.get("seq_lens"):
        kw["sequence_ids"] = torch.cat([torch.full((k,), i) for i, k in enumerate(spec["seq_lens"])])
        assert kw["sequence_ids"].numel() == n
    elif spec.get("seq") or spec["loss_type"] == "gspo":
        kw["sequence_ids"] = torch.arange(n) // 4
    if spec.get("mask_first"):
        mask[0] = 0.0
    if spec.get("beh"):
        kw["behaviour_logprobs"] = (logp_gold + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).float()
        kw["behaviour_mask"] = torch.rand(n, generator=g) > 0.2
        kw.update({k: spec[k] for k in ("is_mode", "is_cap", "is_low", "is_high") if k in spec})
    if spec.get("distill"):
        k = spec["distill"]
        kw["distill_ids"] = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        kw["distill_logprobs"] = torch.log_softmax(2 * torch.randn(n, k + 1, generator=g), 1)[:, :k]
        kw["distill_mask"] = torch.rand(n, generator=g) > 0.2
        kw.update(distill_coef=0.8, distill_mode=spec["distill_mode"])
    return dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, loss_mask=mask, kw=kw,
                chunk_size=spec.get("chunk_size"))


def _logprob_inputs(name, spec):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n, d, v = 37, 48, spec.get("V", 1000)
    dt = DTYPES[spec["dtype"]]
    if spec.get("large"):
        h, w, t = large_logit_inputs(n, d, v, dt, seed=zlib.crc32(name.encode()) % 1000)
        return dict(hidden=h, weight=w, targets=t, grad_out=torch.randn(n, generator=g), temperature=spec["temperature"])
    return dict(hidden=(torch.randn(n, d, generator=g) * 0.5).to(dt), weight=(torch.randn(v, d, generator=g) * 0.5).to(dt),
                targets=torch.randint(0, v, (n,), generator=g), grad_out=torch.randn(n, generator=g),
                temperature=spec["temperature"])


def _ops_inputs(dname):
    g = torch.Generator().manual_seed(7)
    c, v, d = 21, 1000, 48
    dt = DTYPES[dname]
    return dict(z=(torch.randn(c, v, generator=g) * 4).to(dt), targets=torch.randint(0, v, (c,), generator=g),
                coef=torch.randn(c, generator=g), h=torch.randn(c, d, generator=g).to(dt),
                dw0=torch.randn(v, d, generator=g), w=torch.randn(v, d, generator=g).to(dt), inv_t=1 / 0.8)


# ---------------------------------------------------------------------------------------------
# The interpreted side (runs in the child process)


def _patch_interpreter_bf16():
    """Make the 3.9 interpreter's bf16 `tl.dot` and fp32 -> bf16 cast behave as on a GPU.

    - `tl.dot` multiplies bf16's raw uint16 bits (observed in the 3.9 interpreter). bf16 is the top half of an fp32, so
      widening the bits (`<< 16`, viewed as float32) is exact; the GPU's bf16 dot multiplies
      exactly these values with an fp32 accumulator.
    - `x.to(tl.bfloat16)` truncates the mantissa in the interpreter (`cast_impl` passes no
      rounding mode), where the GPU rounds to nearest even: a one-ulp error (seen: 0.0155 on a
      dZ of ~3.7) that plain torch does not make. Patched to round-to-nearest-even on the bits.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_dot
    orig_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return orig_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl

    def widen(x):
        if x.dtype.is_bf16():
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _worker(in_path: str, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_bf16()
    import kernels
    from kernels import triton_linear_loss as tll

    data = torch.load(in_path, weights_only=True)
    out = {}
    real_row_stats, calls = tll.TritonOps.row_stats, []
    tll.TritonOps.row_stats = staticmethod(lambda *a: calls.append(1) or real_row_stats(*a))
    for name, x in data["policy"].items():
        calls.clear()
        h = x["hidden"].clone().requires_grad_(True)
        w = x["weight"].clone().requires_grad_(True)
        loss, stats = call(kernels.fused_linear_policy_loss, h, w, x["targets"], x["advantages"], x["loss_mask"],
                                                             backend="triton", chunk_size=x["chunk_size"], **x["kw"])
        loss.backward()
        out[name] = dict(loss=loss.detach(), grad_h=h.grad, grad_w=w.grad, logprobs=stats["logprobs"],
                         entropy=stats["entropy"], clip_frac=stats["clip_frac"], row_stats_calls=torch.tensor(len(calls)))
    tll.TritonOps.row_stats = real_row_stats
    for name, x in data["logprobs"].items():
        h = x["hidden"].clone().requires_grad_(True)
        w = x["weight"].clone().requires_grad_(True)
        lp = kernels.linear_logprobs(h, w, x["targets"], temperature=x["temperature"], backend="triton")
        (lp * x["grad_out"]).sum().backward()
        out[name] = dict(logp=lp.detach(), grad_h=h.grad, grad_w=w.grad)
    for dname, x in data["ops"].items():
        for label, row_cfg, dw_cfg in (("default", None, None), ("small", SMALL_ROW, SMALL_DW)):
            z = x["z"].clone()
            lse, logp, ent = tll.row_stats(z, x["targets"], x["inv_t"], config=row_cfg)
            dz = tll.dlogits(z, lse, x["targets"], x["coef"], x["inv_t"], z.dtype, config=row_cfg)
            dw = x["dw0"].clone()
            tll.accumulate_dw(dw, dz, x["h"], config=dw_cfg)
            # dW from the reference dZ too, so the GEMM is checked on its own.
            ref_dz = _torch_ops_chain(x, torch.float64)[3].to(z.dtype)
            dw_ref_in = x["dw0"].clone()
            tll.accumulate_dw(dw_ref_in, ref_dz, x["h"], config=dw_cfg)
            lse_only, logp_only = tll.row_logprobs(x["z"].clone(), x["targets"], x["inv_t"], config=row_cfg)
            out[f"ops_{dname}_{label}"] = dict(lse=lse, logp=logp, entropy=ent, lse_only=lse_only, logp_only=logp_only, dz=dz, dw=dw, dw_from_ref_dz=dw_ref_in,
                                               in_place=torch.tensor(dz.data_ptr() == z.data_ptr()),
                                               logits=tll.TritonOps.logits(x["h"], x["w"]))
    vocabs = [33, 1000, 4500, 32768, 151936]
    dw_cfgs = [tll.launch_config("accumulate_dw", vocab=v, dim=48, dtype=torch.bfloat16) for v in vocabs]
    try:
        tll.launch_config("softmax", vocab=10)
        raises = False
    except ValueError as e:
        raises = "kernel" in str(e)
    out["launch_config"] = dict(
        vocab=torch.tensor(vocabs),
        row_block_v=torch.tensor([tll.launch_config("row_stats", vocab=v)["BLOCK_V"] for v in vocabs]),
        dw_min_block=torch.tensor([min(c["BLOCK_C"], c["BLOCK_V"], c["BLOCK_D"]) for c in dw_cfgs]),
        dw_block_d=torch.tensor([c["BLOCK_D"] for c in dw_cfgs]),
        unknown_kernel_raises=torch.tensor(raises))
    torch.save(out, out_path)


def _torch_ops_chain(x, dtype):
    """The ops chain on the ops inputs: (lse, logp, entropy, dz, dw). In fp64 it is the gold,
    written out here because `TorchOps.row_stats` computes in fp32 whatever its input; in other
    dtypes it is `TorchOps` itself (the same-dtype baseline)."""
    if dtype != torch.float64:
        lse, logp, ent, buf = TorchOps.row_stats(x["z"].clone(), x["targets"], x["inv_t"])
        dz = TorchOps.dlogits(buf, lse, x["targets"], x["coef"], x["inv_t"], dtype)
        dw = x["dw0"].clone()
        TorchOps.accumulate_dw(dw, dz, x["h"])
        return lse, logp, ent, dz, dw
    s = x["z"].double() * x["inv_t"]
    lse = torch.logsumexp(s, dim=1)
    rows = torch.arange(s.shape[0])
    logq = s - lse[:, None]
    p = logq.exp()
    c = x["coef"].double() * x["inv_t"]
    dz = -c[:, None] * p
    dz[rows, x["targets"]] += c
    return lse, s[rows, x["targets"]] - lse, -(p * logq).sum(1), dz, x["dw0"].double() + dz.t() @ x["h"].double()


# ---------------------------------------------------------------------------------------------
# The parent side


def _err(a, gold):
    return (a.double() - gold.double()).abs().max().item() if gold.numel() else 0.0


def _check(name, what, kernel, torch_same_dtype, gold, dname):
    assert torch.isfinite(kernel.double()).all(), f"{name}/{what}: non-finite values"
    k_err, t_err = _err(kernel, gold), _err(torch_same_dtype, gold)
    scale = gold.double().abs().max().item() if gold.numel() else 0.0
    bound = 2 * t_err + ATOL[dname] * scale
    assert k_err <= bound, f"{name}/{what}: kernel err {k_err:.3g} > 2 * torch err {t_err:.3g} + atol ({bound:.3g})"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Build every case's inputs, run all Triton computations in one interpreted child process."""
    d = tmp_path_factory.mktemp("triton_interp")
    data = {"policy": {k: _policy_inputs(k, s) for k, s in POLICY_CASES.items()},
            "logprobs": {k: _logprob_inputs(k, s) for k, s in LOGPROB_CASES.items()},
            "ops": {k: _ops_inputs(k) for k in OPS_DTYPES}}
    torch.save(data, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(d / "in.pt"), str(d / "out.pt")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"interpreted worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return data, torch.load(d / "out.pt", weights_only=True)


def _grads_of_ref(x, upcast):
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    loss, stats = call(policy_loss_ref, h, w, x["targets"], x["advantages"], x["loss_mask"], upcast=upcast,
                       **x["kw"])
    loss.backward()
    return loss.detach(), h.grad, w.grad, stats


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(POLICY_CASES))
def test_policy_loss_matches_reference(interpreted, name):
    data, out = interpreted
    x, got, dname = data["policy"][name], out[name], POLICY_CASES[name]["dtype"]
    gold_loss, gold_gh, gold_gw, gold_stats = _grads_of_ref(x, upcast=True)
    t_loss, t_gh, t_gw, t_stats = _grads_of_ref(x, upcast=False)
    _check(name, "loss", got["loss"], t_loss, gold_loss, dname)
    _check(name, "grad_hidden", got["grad_h"], t_gh, gold_gh, dname)
    _check(name, "grad_weight", got["grad_w"], t_gw, gold_gw, dname)
    _check(name, "logprobs", got["logprobs"], t_stats["logprobs"], gold_stats["logprobs"], dname)
    _check(name, "entropy", got["entropy"], t_stats["entropy"], gold_stats["entropy"], dname)
    assert got["grad_h"].dtype == x["hidden"].dtype and got["grad_w"].dtype == x["weight"].dtype
    # Clipping decisions sit on thresholds; a token may flip between dtypes, never many.
    n_tok = max(float(x["loss_mask"].sum()), 1.0)
    assert abs(got["clip_frac"].item() - gold_stats["clip_frac"].item()) <= 2.0 / n_tok + 1e-6
    spec = POLICY_CASES[name]
    if spec.get("old") and spec["loss_type"] == "grpo" and not spec.get("all_masked"):
        assert 0 < gold_stats["clip_frac"].item() < 1, "the case should exercise both clip branches"


@pytest.mark.interpret
def test_fully_masked_batch_is_zero(interpreted):
    data, out = interpreted
    got = out["grpo_fp16_masked_batch"]
    assert got["loss"].item() == 0.0
    for k in ("grad_h", "grad_w", "logprobs"):
        assert torch.isfinite(got[k].float()).all() and (got[k] == 0).all(), k


@pytest.mark.interpret
def test_masked_rows_get_zero_gradient(interpreted):
    data, out = interpreted
    for name in ("awsft_fp32", "grpo_old_bf16"):
        masked = data["policy"][name]["loss_mask"] == 0
        assert masked.any() and (out[name]["grad_h"][masked] == 0).all()
        assert (out[name]["logprobs"][masked] == 0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(LOGPROB_CASES))
def test_linear_logprobs_forward_backward(interpreted, name):
    data, out = interpreted
    x, got, dname = data["logprobs"][name], out[name], LOGPROB_CASES[name]["dtype"]
    results = {}
    for upcast in (True, False):
        h = x["hidden"].clone().requires_grad_(True)
        w = x["weight"].clone().requires_grad_(True)
        lp, _ = linear_logprobs_ref(h, w, x["targets"], x["temperature"], upcast=upcast)
        (lp * x["grad_out"].to(lp.dtype)).sum().backward()
        results[upcast] = (lp.detach(), h.grad, w.grad)
    for i, what in enumerate(("logp", "grad_h", "grad_w")):
        _check(name, what, got[what], results[False][i], results[True][i], dname)


@pytest.mark.interpret
def test_logp_error_at_large_logits(interpreted):
    """At |z| ~ 16-32 the Triton path's logp is within 2x the error of fp32-logits torch (issue #15);
    logits rounded to bf16 first (the control) are not."""
    data, out = interpreted
    name = "logprobs_bf16_large_logits_t07"
    x, got = data["logprobs"][name], out[name]
    gold, _ = linear_logprobs_ref(x["hidden"], x["weight"], x["targets"], x["temperature"], upcast=True)
    f32, _ = linear_logprobs_ref(x["hidden"].float(), x["weight"].float(), x["targets"], x["temperature"],
                                 upcast=False)
    rounded, _ = linear_logprobs_ref(x["hidden"], x["weight"], x["targets"], x["temperature"], upcast=False)
    bound = 2 * _err(f32, gold) + 2e-6 * gold.abs().max().item()
    assert _err(rounded, gold) > 10 * bound
    assert _err(got["logp"], gold) <= bound, f"{_err(got['logp'], gold):.3e} > {bound:.3e}"


@pytest.mark.interpret
@pytest.mark.parametrize("label", ["default", "small"])
@pytest.mark.parametrize("dname", OPS_DTYPES)
def test_ops_match_torch_ops(interpreted, dname, label):
    """Each TritonOps method against TorchOps (same dtype) and TorchOps in fp64, default and small blocks."""
    data, out = interpreted
    x, got = data["ops"][dname], out[f"ops_{dname}_{label}"]
    gold = _torch_ops_chain(x, torch.float64)
    same = _torch_ops_chain(x, DTYPES[dname])
    name = f"ops_{dname}_{label}"
    for i, what in enumerate(("lse", "logp", "entropy")):
        _check(name, what, got[what], same[i], gold[i], dname)
    _check(name, "dz", got["dz"], same[3], gold[3], dname)
    assert got["dz"].dtype == DTYPES[dname] and bool(got["in_place"]), "dZ must overwrite the logits chunk"
    # Both are one torch.mm (thread counts differ between the processes: not bit-equal by contract).
    torch.testing.assert_close(got["logits"], TorchOps.logits(x["h"], x["w"]))
    # dW: the whole chain, then the GEMM alone on the reference dZ (rounded to the dtype) against
    # an fp64 GEMM of the same rounded operands: only accumulation error is left.
    _check(name, "dw", got["dw"], same[4], gold[4], dname)
    ref_dz = gold[3].to(DTYPES[dname])
    exact = x["dw0"].double() + ref_dz.double().t() @ x["h"].double()
    torch_dw = x["dw0"].clone()
    TorchOps.accumulate_dw(torch_dw, ref_dz, x["h"])
    _check(name, "dw_gemm", got["dw_from_ref_dz"], torch_dw, exact, dname)
    # fp32 accumulation: within a few fp32 ulps of the exact sum whatever the input dtype.
    assert _err(got["dw_from_ref_dz"], exact) <= 1e-5 * max(1.0, exact.abs().max().item())


@pytest.mark.interpret
@pytest.mark.parametrize("label", ["default", "small"])
@pytest.mark.parametrize("dname", OPS_DTYPES)
def test_row_logprobs_matches_reference(interpreted, dname, label):
    """The logprob-only row pass (ENTROPY=False) against TorchOps and fp64, and equal to row_stats'."""
    data, out = interpreted
    x, got = data["ops"][dname], out[f"ops_{dname}_{label}"]
    gold, same = _torch_ops_chain(x, torch.float64), _torch_ops_chain(x, DTYPES[dname])
    for i, what in enumerate(("lse", "logp")):
        _check(f"row_logprobs_{dname}_{label}", what, got[f"{what}_only"], same[i], gold[i], dname)
        torch.testing.assert_close(got[f"{what}_only"], got[what], rtol=0, atol=0)


@pytest.mark.interpret
def test_gspo_first_pass_is_logprob_only(interpreted):
    """GSPO's first pass never runs row_stats (the entropy pass): only pass 2's chunks do."""
    data, out = interpreted
    name = "gspo_token_adv_varlen_fp32"
    x = data["policy"][name]
    seq, adv, m = x["kw"]["sequence_ids"], x["advantages"], x["loss_mask"] != 0
    assert sum(adv[(seq == s) & m].unique().numel() > 1 for s in seq.unique()) >= 3 and not m[0]
    assert int(out[name]["row_stats_calls"]) == -(-int(m.sum()) // POLICY_CASES[name]["chunk_size"])
    assert 0 < _grads_of_ref(x, upcast=True)[3]["clip_frac"].item() < 1


@pytest.mark.interpret
def test_launch_config_sizes(interpreted):
    """Heuristic output (computed in the child: this process never imports triton)."""
    _, out = interpreted
    cfgs = out["launch_config"]
    for v, bv in zip(cfgs["vocab"].tolist(), cfgs["row_block_v"].tolist()):
        assert 16 <= bv <= 4096 and bv & (bv - 1) == 0 and (bv >= v or bv == 4096)
    # tl.dot needs every operand dimension >= 16; D = 48 gets the next power of two.
    assert cfgs["dw_min_block"].min().item() >= 16 and (cfgs["dw_block_d"] == 64).all()
    assert bool(cfgs["unknown_kernel_raises"])


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at real vocabularies (collected everywhere, skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 151936])
def test_gpu_bf16_large_vocab(vocab):
    import kernels

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(vocab)
    n, d = 512, 1024
    hidden = (torch.randn(n, d, device=dev, generator=g) * 0.5).bfloat16()
    weight = (torch.randn(vocab, d, device=dev, generator=g) * 0.05).bfloat16()
    targets = torch.randint(0, vocab, (n,), device=dev, generator=g)
    mask = (torch.rand(n, device=dev, generator=g) > 0.4).float()
    adv = torch.randn(n, device=dev, generator=g)
    logp_gold, _ = linear_logprobs_ref(hidden, weight, targets, 0.9)
    old = (logp_gold + 0.3 * torch.randn(n, device=dev, generator=g, dtype=torch.float64)).float()
    kw = dict(loss_type="grpo", old_logprobs=old, temperature=0.9)
    x = dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, loss_mask=mask, kw=kw)
    gold = _grads_of_ref(x, upcast=True)
    same = _grads_of_ref(x, upcast=False)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    # chunk_size 128 so that dW accumulates over several chunks.
    loss, stats = call(kernels.fused_linear_policy_loss, h, w, targets, adv, mask, backend="triton", chunk_size=128,
                             **kw)
    loss.backward()
    name = f"gpu_v{vocab}"
    _check(name, "loss", loss.detach(), same[0], gold[0], "bf16")
    _check(name, "grad_hidden", h.grad, same[1], gold[1], "bf16")
    _check(name, "grad_weight", w.grad, same[2], gold[2], "bf16")
    _check(name, "logprobs", stats["logprobs"], same[3]["logprobs"], gold[3]["logprobs"], "bf16")
    _check(name, "entropy", stats["entropy"], same[3]["entropy"], gold[3]["entropy"], "bf16")

    lp_k = kernels.linear_logprobs(hidden, weight, targets, temperature=0.9, backend="triton")
    lp_t, _ = linear_logprobs_ref(hidden, weight, targets, 0.9, upcast=False)
    _check(name, "linear_logprobs", lp_k, lp_t, logp_gold, "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 152064])
def test_gpu_logp_error_at_large_logits(vocab):
    """Compiled kernels, target logits at |z| ~ 16-32: logp within 2x the fp32-logits torch error
    against fp64 (the bf16-baseline rule above cannot see bf16-rounded logits: it rounds too)."""
    import kernels

    dev = torch.device("cuda")
    h, w, t = large_logit_inputs(512, 1024, vocab, torch.bfloat16, seed=vocab % 97, device=dev)
    for temp in (1.0, 0.7):
        gold, _ = linear_logprobs_ref(h, w, t, temp, upcast=True)
        f32, _ = linear_logprobs_ref(h.float(), w.float(), t, temp, upcast=False)
        bound = 2 * _err(f32, gold) + 2e-6 * gold.abs().max().item()
        lp = kernels.linear_logprobs(h, w, t, temperature=temp, backend="triton")
        assert _err(lp, gold) <= bound, f"T={temp}: {_err(lp, gold):.3e} > {bound:.3e}"
        adv = torch.randn(512, device=dev)
        mask = torch.ones(512, device=dev)
        _, st = call(kernels.fused_linear_policy_loss, h, w, t, adv, mask, temperature=temp, backend="triton",
                                                       validate=False, num_selected=512, normalizer=512.0)
        assert _err(st["logprobs"], gold) <= bound


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
