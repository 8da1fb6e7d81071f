"""`make gpu-check`: one command that proves the GPU path on one GPU, in under 8 minutes on an H200.

    python bench/gpu_check.py                 # all stages on cuda:0
    python bench/gpu_check.py --stages 1,2    # some of them
    python bench/gpu_check.py --smoke         # tiny shapes on CPU (torch backend): checks the script

Stages (each passes or fails on its own; the exit code is 1 when any failed, 0 otherwise):
  0  versions, GPU name; measured ceilings: an 8192^3 bf16 GEMM (TFLOP/s) and a device-to-device
     copy (GB/s, bytes read + written).
  1  kernel correctness against fp64 (`kernels.reference`, error rule: err <= 2*torch_err +
     atol for loss, both gradients, logprobs, entropy): bf16/fp16/fp32 x awsft / grpo with old
     logprobs / cispo + KL x temperature 1 and 0.7, at (777, 4096, 128256), (777, 3584, 152064) and a
     tiny vocabulary; default, small and odd chunk sizes; all-masked and all-selected; logits at
     |z| ~ 16-32 against fp32-logits torch (issue #15); one chunk with C*V > 2^31 (int64 offsets);
     Triton against the torch backend; `linear_logprobs` forward and backward; zero register spills
     in every kernel the run compiled.
  2  memory and host syncs at N=8192 D=4096 V=128256 bf16 (trainer-path call): extra peak memory,
     no tensor of N*V elements allocated (every op's output recorded), host syncs per call counted
     with `torch.cuda.set_sync_debug_mode` (must be 0 on the trainer path).
  3  the loss benchmark: ours (Triton), the torch backend, naive, Liger's Triton fused linear CE
     (when liger-kernel is installed; skipped with a note otherwise) and the 6*N*D*V GEMM floor, at
     N=4096 and 8192 (D=4096, V=128256) and at Qwen's vocabulary (D=3584, V=152064), with ours'
     per-pass split (ms, TFLOP/s or GB/s, share of the floor).
  4  FSDP2 on one GPU (a one-rank group, as a plain `python drivers/train.py` gets): a bf16
     mixed-precision step of a locally built Qwen2-shaped model (V=128256, tied and untied) against
     one fp32 process; then the driver's step loop in process (Atropos-format groups ->
     `build_train_batch` -> `train_step` x3 -> `save_checkpoint`), without an inference server; then
     `drivers/train.py` itself, as a child process, for 3 steps on synthetic batches
     (`--atropos-url synthetic`: no API, vLLM or environment; exit 0, metrics, checkpoint).

What it needs: CUDA torch >= 2.8 (for `torch.mm(out_dtype=)`), Triton, transformers, numpy and this
checkout; nothing else. It imports only `kernels` and the `atropos_core` modules of the model/loss/
FSDP path (no requests, tenacity, atroposlib or vLLM: tests/test_gpu_check.py runs the smoke mode with
those imports blocked). Liger's row needs the `liger-kernel` wheel (0.8.5; pure Python + Triton).

Output: one line per check while it runs, a summary table per stage, the whole result as JSON
(`bench/results/gpu_check/<date>-<commit>.json`) and rows appended to `bench/results/gpu_check.csv`
(device, commit, date, stage, case, metric, value, unit, ok); stage 3's rows also go to
`bench/results/loss.csv` beside the CPU ones.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from bench.common import append_rows, run_meta  # noqa: E402

CSV_FIELDS = ["device", "commit", "date", "stage", "case", "metric", "value", "unit", "ok"]
LOSS_FIELDS = ["device", "commit", "date", "provider", "N", "D", "V", "dtype", "ms_median", "peak_mem_mb"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REL_ATOL = {"bf16": 2e-3, "fp16": 2e-4, "fp32": 1e-6}
LOSSES = {  # name: (loss_type, old logprobs, kl_coef)
    "awsft": ("awsft", False, 0.0),
    "grpo_old": ("grpo", True, 0.0),
    "cispo_kl": ("cispo", True, 0.05),
}


class Stage:
    """Collects one stage's checks and numbers; a failed check fails the stage, not the run."""

    def __init__(self, num: int, title: str):
        self.num, self.title = num, title
        self.checks: list[dict] = []
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.error = ""
        self.t0 = time.perf_counter()

    def check(self, case: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"case": case, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {case}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def metric(self, case: str, metric: str, value, unit: str = "", ok=None) -> None:
        v = round(float(value), 4) if isinstance(value, (int, float)) else value
        self.rows.append({"stage": self.num, "case": case, "metric": metric, "value": v, "unit": unit,
                          "ok": "" if ok is None else int(bool(ok))})

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    @property
    def status(self) -> str:
        if self.error or any(not c["ok"] for c in self.checks):
            return "fail"
        return "pass" if self.checks or self.rows else "skip"

    def result(self) -> dict:
        return {"stage": self.num, "title": self.title, "status": self.status,
                "seconds": round(time.perf_counter() - self.t0, 1), "checks": self.checks,
                "rows": self.rows, "notes": self.notes, "error": self.error}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_ms(fn, dev, reps: int, warmup: int = 1) -> float:
    """Median wall ms of `fn()` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------------
# Stage 0


def stage0(st: Stage, dev, smoke: bool) -> dict:
    import importlib

    for mod in ("torch", "triton", "transformers", "numpy", "liger_kernel"):
        try:
            v = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - an absent optional package is a note
            v = f"absent ({type(e).__name__})"
        st.metric("versions", mod, v)
    st.metric("versions", "python", platform.python_version())
    st.metric("versions", "cuda", str(torch.version.cuda))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    st.metric("device", "name", name)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        st.metric("device", "capability", f"{cap[0]}.{cap[1]}")
        st.metric("device", "memory_gib", torch.cuda.get_device_properties(dev).total_memory / 2**30, "GiB")
    n = 1024 if smoke else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = _time_ms(lambda: torch.mm(a, b), dev, reps=3 if smoke else 20, warmup=1 if smoke else 5)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    st.metric(f"gemm_bf16_{n}^3", "tflops", tflops, "TFLOP/s")
    st.metric(f"gemm_bf16_{n}^3", "ms", ms, "ms")
    st.check(f"bf16 GEMM {n}^3 runs", tflops > 0, f"{tflops:.1f} TFLOP/s")
    nbytes = (64 << 20) if smoke else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), dev, reps=3 if smoke else 20, warmup=1 if smoke else 3)
    gbs = 2 * nbytes / (ms * 1e-3) / 1e9
    st.metric("d2d_copy", "gb_per_s", gbs, "GB/s (read+write)")
    st.check("device-to-device copy runs", gbs > 0, f"{gbs:.0f} GB/s")
    return {"gemm_tflops": tflops, "copy_gbs": gbs}


# ------------------------------------------------------------------------------------------------
# Stage 1


def _err(x, gold) -> float:
    return (x.double() - gold.double()).abs().max().item() if gold.numel() else 0.0


def _rule(st: Stage, case: str, what: str, kern, same, gold, dname: str, scale=None) -> bool:
    if gold.numel() == 0:
        return True
    scale = gold.double().abs().max().item() if scale is None else scale
    ek, et = _err(kern, gold), _err(same, gold)
    bound = 2 * et + REL_ATOL[dname] * max(scale, 1e-30)
    ok = math.isfinite(ek) and ek <= bound
    if not ok:
        st.check(f"{case} {what}", False, f"err {ek:.3e} > 2*torch {et:.3e} + atol = {bound:.3e}")
    return ok


def _case_inputs(n, d, v, dt, dev, seed, temperature, mask_kind="mixed", near_gold=True):
    """Inputs of one case; old/ref logprobs near the fp64 logp (both clip branches hit), or, for
    shapes whose fp64 logits would not fit (`near_gold=False`), around -3."""
    from kernels.reference import linear_logprobs_ref

    g = torch.Generator(device=dev).manual_seed(seed)  # drawn on the device: (V, D) is large
    hidden = (torch.randn(n, d, generator=g, device=dev) * 0.5).to(dt)
    weight = (torch.randn(v, d, generator=g, device=dev) * (2.0 / math.sqrt(d))).to(dt)
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    adv = torch.randn(n, generator=g, device=dev)
    mask = {"mixed": (torch.rand(n, generator=g, device=dev) > 0.4).float(), "all": torch.ones(n, device=dev),
            "none": torch.zeros(n, device=dev)}[mask_kind]
    if near_gold:
        with torch.no_grad():
            gold_lp, _ = linear_logprobs_ref(hidden, weight, targets, temperature)
    else:
        gold_lp = torch.full((n,), -3.0, dtype=torch.float64, device=dev)
    old = (gold_lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64, device=dev)).float()
    ref = (gold_lp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64, device=dev)).float()
    return hidden, weight, targets, adv, mask, old, ref


def _run_loss(fn, hidden, weight, targets, adv, mask, spec, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, stats = fn(h, w, targets, adv, mask, spec, **kw)
    loss.backward()
    return loss.detach(), stats, h.grad, w.grad


def _policy_case(st, case, backend, n, d, v, dname, loss_name, temperature, dev, *, chunk=None,
                 mask_kind="mixed", compare_torch=False) -> bool:
    import kernels
    from kernels.reference import policy_loss_ref

    dt = DTYPES[dname]
    loss_type, with_old, kl = LOSSES[loss_name]
    hidden, weight, targets, adv, mask, old, ref = _case_inputs(n, d, v, dt, dev, zlib.crc32(case.encode()) % 10000,
                                                                temperature, mask_kind)
    spec = kernels.LossSpec(loss_type=loss_type, clip_high=0.2, temperature=temperature, kl_coef=kl,
                            backend=backend, chunk_size=chunk)
    kw = dict(old_logprobs=old if with_old else None, ref_logprobs=ref if kl > 0 else None)
    ours = _run_loss(kernels.fused_linear_policy_loss, hidden, weight, targets, adv, mask, spec, **kw)
    same = _run_loss(lambda *a, **k: policy_loss_ref(*a, upcast=False, **k), hidden, weight, targets, adv, mask,
                     spec, **kw)
    gold = _run_loss(lambda *a, **k: policy_loss_ref(*a, upcast=True, **k), hidden.double(), weight.double(),
                     targets, adv, mask, spec, **kw)
    ok = ours[2].dtype == dt and ours[3].dtype == dt
    z = max(float(mask.sum()), 1.0)
    terms = (adv.double().abs() * gold[1]["logprobs"].abs()).sum().item() / z
    ok &= _rule(st, case, "loss", ours[0], same[0], gold[0], dname, scale=max(terms, 1e-12))
    ok &= _rule(st, case, "grad_hidden", ours[2], same[2], gold[2], dname)
    ok &= _rule(st, case, "grad_weight", ours[3], same[3], gold[3], dname)
    ok &= _rule(st, case, "logprobs", ours[1]["logprobs"], same[1]["logprobs"], gold[1]["logprobs"], dname)
    ok &= _rule(st, case, "entropy", ours[1]["entropy"], same[1]["entropy"], gold[1]["entropy"], dname)
    if mask_kind == "none":
        ok &= ours[0].item() == 0.0 and bool((ours[2] == 0).all()) and bool((ours[3] == 0).all())
    if compare_torch and backend == "triton":
        tor = _run_loss(kernels.fused_linear_policy_loss, hidden, weight, targets, adv, mask,
                        dataclasses.replace(spec, backend="torch"), **kw)
        # Same fp32 logits, other summation orders: both within the fp64 rule; against each other
        # within the same slack.
        ok &= _rule(st, case, "triton_vs_torch_backend_grad_w", ours[3], tor[3], gold[3], dname)
        ok &= _rule(st, case, "triton_vs_torch_backend_logp", ours[1]["logprobs"], tor[1]["logprobs"],
                    gold[1]["logprobs"], dname)
    return bool(ok)


def _large_logits_case(st, backend, dev, smoke: bool) -> bool:
    import kernels
    from kernels.reference import large_logit_inputs, linear_logprobs_ref

    n, d, v = (64, 128, 2000) if smoke else (777, 4096, 128256)
    ok = True
    for dname in ("bf16", "fp16"):
        h, w, t = large_logit_inputs(n, d, v, DTYPES[dname], seed=3, device=dev)
        for temp in (1.0, 0.7):
            gold, _ = linear_logprobs_ref(h, w, t, temp, upcast=True)
            f32, _ = linear_logprobs_ref(h.float(), w.float(), t, temp, upcast=False)
            rounded, _ = linear_logprobs_ref(h, w, t, temp, upcast=False)
            lp = kernels.linear_logprobs(h, w, t, temperature=temp, backend=backend)
            bound = 2 * _err(f32, gold) + 2e-6 * gold.abs().max().item()
            e = _err(lp, gold)
            case = f"large_logits {dname} T={temp}"
            st.metric(case, "logp_err", e)
            st.metric(case, "fp32_logits_err", _err(f32, gold))
            st.metric(case, "rounded_logits_err", _err(rounded, gold))
            ok &= st.check(case, e <= bound, f"logp err {e:.2e} <= {bound:.2e} (rounded logits: {_err(rounded, gold):.2e})")
    return ok


def _linear_logprobs_case(st, backend, n, d, v, dname, temperature, dev) -> bool:
    import kernels
    from kernels.reference import linear_logprobs_ref

    dt = DTYPES[dname]
    hidden, weight, targets, *_ = _case_inputs(n, d, v, dt, dev, 11, temperature)
    up = torch.randn(n, device=dev)

    def run(fn, h, w):
        h = h.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        out = fn(h, w)
        (out.double() * up.double()).sum().backward()
        return out.detach(), h.grad, w.grad
    k = run(lambda h, w: kernels.linear_logprobs(h, w, targets, temperature=temperature, backend=backend),
            hidden, weight)
    s = run(lambda h, w: linear_logprobs_ref(h, w, targets, temperature, upcast=False)[0], hidden, weight)
    g = run(lambda h, w: linear_logprobs_ref(h, w, targets, temperature, upcast=True)[0], hidden.double(),
            weight.double())
    case = f"linear_logprobs {dname} ({n},{d},{v}) T={temperature}"
    ok = all(_rule(st, case, what, a, b, c, dname) for what, a, b, c in zip(("logp", "grad_h", "grad_w"), k, s, g))
    return st.check(case, ok)


def _big_chunk_case(st, backend, dev, smoke: bool) -> bool:
    """One chunk whose C*V passes 2^31 elements: int64 row offsets in every kernel. Gold logp in fp64
    by row blocks (the full fp64 logits would not fit); gradients against the torch backend."""
    import kernels
    from kernels.reference import linear_logprobs_ref

    n, d, v = (300, 32, 5000) if smoke else (17000, 128, 128256)
    dt = torch.bfloat16
    hidden, weight, targets, adv, mask, old, _ = _case_inputs(n, d, v, dt, dev, 5, 1.0, "all", near_gold=False)
    case = f"C*V={n * v:.3g} ({'> 2^31' if n * v > 2**31 else 'smoke: small'})"
    ours = _run_loss(kernels.fused_linear_policy_loss, hidden, weight, targets, adv, mask,
                     kernels.LossSpec(loss_type="grpo", clip_high=0.2, backend=backend, chunk_size=n), old_logprobs=old)
    tor = _run_loss(kernels.fused_linear_policy_loss, hidden, weight, targets, adv, mask,
                    kernels.LossSpec(loss_type="grpo", clip_high=0.2, backend="torch", chunk_size=1024),
                    old_logprobs=old)
    gold = torch.cat([linear_logprobs_ref(hidden[i:i + 1024], weight, targets[i:i + 1024], 1.0)[0]
                      for i in range(0, n, 1024)])
    f32 = torch.cat([linear_logprobs_ref(hidden[i:i + 1024].float(), weight.float(), targets[i:i + 1024], 1.0,
                                         upcast=False)[0] for i in range(0, n, 1024)])
    e = _err(ours[1]["logprobs"], gold)
    bound = 2 * _err(f32, gold) + 2e-6 * gold.abs().max().item()
    ok = e <= bound
    scale = tor[3].double().abs().max().item()
    gw_diff = _err(ours[3], tor[3])
    ok &= gw_diff <= 2e-2 * scale  # bf16 rounding of dW; a wrong offset would be O(scale)
    st.metric(case, "logp_err", e)
    st.metric(case, "grad_w_rel_diff_vs_torch", gw_diff / max(scale, 1e-30))
    return st.check(case, ok, f"logp err {e:.2e} (bound {bound:.2e}), dW vs torch backend {gw_diff / max(scale, 1e-30):.2e}")


def _compiled_kernels(fn) -> list:
    out = []
    caches = getattr(fn, "device_caches", None)
    if caches:
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            if isinstance(cache, dict):
                out += list(cache.values())
    elif isinstance(getattr(fn, "cache", None), dict):
        for c in fn.cache.values():
            out += list(c.values()) if isinstance(c, dict) else []
    return out


def _spill_check(st: Stage) -> None:
    from kernels import triton_linear_loss as tll

    total = 0
    for name in ("_row_stats_kernel", "_dlogits_kernel", "_accumulate_dw_kernel"):
        for k in _compiled_kernels(getattr(tll, name)):
            if hasattr(k, "_init_handles"):
                k._init_handles()
            spills, regs = getattr(k, "n_spills", None), getattr(k, "n_regs", None)
            total += 1
            st.metric(name, "spills", spills if spills is not None else -1)
            st.metric(name, "registers", regs if regs is not None else -1)
            st.check(f"{name} compiled without spills", spills == 0, f"{regs} registers, {spills} spills")
    if total == 0:
        st.check("compiled kernels found for the spill check", False, "no compiled Triton kernel in the JIT caches")


def stage1(st: Stage, dev, smoke: bool) -> None:
    backend = "triton" if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    st.note(f"backend under test: {backend}")
    shapes = [(37, 48, 1000), (29, 40, 1500), (5, 16, 33)] if smoke else [
        (777, 4096, 128256), (777, 3584, 152064), (777, 256, 33)]
    small, odd = (8, 13) if smoke else (64, 333)
    n_ok = n_all = 0
    for si, (n, d, v) in enumerate(shapes):
        for dname in DTYPES:
            for loss_name in LOSSES:
                for temp in (1.0, 0.7):
                    chunk = (None, small, odd)[(si + list(LOSSES).index(loss_name)) % 3]
                    case = f"{loss_name} {dname} ({n},{d},{v}) T={temp} chunk={chunk or 'default'}"
                    ok = _policy_case(st, case, backend, n, d, v, dname, loss_name, temp, dev, chunk=chunk,
                                      compare_torch=(si == 0 and temp == 1.0))
                    n_ok += ok
                    n_all += 1
        st.check(f"policy loss ({n},{d},{v}): all dtypes x losses x temperatures", n_ok == n_all,
                 f"{n_ok}/{n_all} so far")
    n, d, v = shapes[0]
    for mask_kind in ("none", "all"):
        case = f"grpo_old bf16 ({n},{d},{v}) mask={mask_kind}"
        st.check(case, _policy_case(st, case, backend, n, d, v, "bf16", "grpo_old", 1.0, dev, mask_kind=mask_kind))
    _large_logits_case(st, backend, dev, smoke)
    for dname in DTYPES:
        _linear_logprobs_case(st, backend, n, d, v, dname, 0.7, dev)
    _big_chunk_case(st, backend, dev, smoke)
    if dev.type == "cuda":
        _spill_check(st)
    else:
        st.note("spill check skipped: nothing is compiled on CPU")


# ------------------------------------------------------------------------------------------------
# Stage 2


class _ShapeRecorder:
    """Records the element count of every tensor any torch op creates (TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self
        self.max_numel, self.max_op = 0, ""

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor) and t.numel() > rec.max_numel:
                        rec.max_numel, rec.max_op = t.numel(), f"{func} -> {tuple(t.shape)}"
                return out
        self.mode = Mode()


def stage2(st: Stage, dev, smoke: bool) -> None:
    import kernels

    n, d, v = (256, 64, 4000) if smoke else (8192, 4096, 128256)
    dt = torch.bfloat16
    backend = "triton" if dev.type == "cuda" else "torch"
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(n, d, generator=g, device=dev) * 0.5).to(dt).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g, device=dev) / math.sqrt(d)).to(dt).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    adv = torch.randn(n, generator=g, device=dev)
    mask = (torch.rand(n, generator=g, device=dev) > 0.25).float()
    k = int((mask != 0).sum())  # the host-side count the trainer has (counted before the batch moved)
    old = -3 + torch.randn(n, generator=g, device=dev)

    spec = kernels.LossSpec(loss_type="grpo", clip_high=0.2, backend=backend)

    def call(trainer_path: bool):
        hidden.grad = weight.grad = None
        kw = dict(validate=False, num_selected=k, normalizer=float(k)) if trainer_path else {}
        loss, _ = kernels.fused_linear_policy_loss(hidden, weight, targets, adv, mask, spec, old_logprobs=old, **kw)
        loss.backward()
    call(True)  # warm-up: compiles, probes, allocator pools
    call(False)
    _sync(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rec = _ShapeRecorder()
    with rec.mode:
        call(True)
    _sync(dev)
    if dev.type == "cuda":
        extra = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        st.metric("N=%d D=%d V=%d bf16" % (n, d, v), "extra_peak_gib", extra, "GiB", ok=extra <= 4.5 * 1e9 / 2**30)
        st.check("extra peak memory measured", True, f"{extra:.2f} GiB (target <= 4.19 GiB = 4.5 GB)")
    st.metric("largest tensor", "numel", rec.max_numel)
    st.check("no N x V tensor allocated", rec.max_numel < n * v,
             f"largest {rec.max_numel:,} elements ({rec.max_op}) < N*V = {n * v:,}")
    if dev.type != "cuda":
        st.note("host-sync count skipped: torch.cuda.set_sync_debug_mode needs CUDA")
        return
    for label, trainer_path in (("trainer path (validate=False, num_selected, normalizer)", True),
                                ("default call (validated)", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call(trainer_path)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        st.metric(label, "host_syncs_per_call", len(syncs))
        if trainer_path:
            where = "; ".join(sorted({str(w.message)[:80] for w in syncs}))[:300]
            st.check("no host sync on the trainer path", not syncs, f"{len(syncs)} sync(s) {where}")
        else:
            st.note(f"default (validating) call: {len(syncs)} host sync(s)")


# ------------------------------------------------------------------------------------------------
# Stage 3


class _TimedOps:
    """Wraps a backend's chunk operations with CUDA events: per-pass time of ours."""

    def __init__(self, ops, dev):
        self.ops, self.dev, self.events = ops, dev, []
        self.name, self.direct_dw_out = ops.name, ops.direct_dw_out

    def _timed(self, what, fn, *a, **k):
        if self.dev.type != "cuda":
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.events.append((what, t0, time.perf_counter()))
            return out
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn(*a, **k)
        e.record()
        self.events.append((what, s, e))
        return out

    def logits(self, *a, **k):
        return self._timed("logits GEMM", self.ops.logits, *a, **k)

    def row_stats(self, *a, **k):
        return self._timed("row_stats", self.ops.row_stats, *a, **k)

    def dlogits(self, *a, **k):
        return self._timed("dlogits", self.ops.dlogits, *a, **k)

    def accumulate_dw(self, *a, **k):
        return self._timed("dW GEMM", self.ops.accumulate_dw, *a, **k)

    def split_ms(self) -> dict:
        out: dict = {}
        for what, s, e in self.events:
            ms = s.elapsed_time(e) if self.dev.type == "cuda" else (e - s) * 1e3
            out[what] = out.get(what, 0.0) + ms
        return out


def _provider_step(provider, hidden, weight, targets, adv, mask, backend):
    import torch.nn.functional as F

    import kernels
    from kernels.reference import policy_loss_ref

    def run(loss_fn):
        def step():
            hidden.grad = weight.grad = None
            loss_fn().backward()
        return step
    n = hidden.shape[0]
    if provider in ("ours", "torch_backend"):
        b = backend if provider == "ours" else "torch"
        spec = kernels.LossSpec(loss_type="grpo", backend=b)
        return run(lambda: kernels.fused_linear_policy_loss(hidden, weight, targets, adv, mask, spec, validate=False,
                                                            num_selected=n, normalizer=float(n))[0])
    if provider == "naive":
        return run(lambda: policy_loss_ref(hidden, weight, targets, adv, mask, kernels.LossSpec(loss_type="grpo"),
                                           upcast=False)[0])
    if provider == "liger_triton":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        return run(lambda: mod(weight, hidden, targets))
    if provider == "gemm_floor":
        def step():
            with torch.no_grad():
                z = torch.mm(hidden, weight.t())
                torch.mm(z, weight)
                torch.mm(z.t(), hidden)
        return step
    if provider == "torch_lce":
        return run(lambda: F.linear_cross_entropy(hidden, weight, targets))
    raise ValueError(provider)


def stage3(st: Stage, dev, smoke: bool, ceilings: dict) -> list:
    import kernels
    import kernels.chunked as kc

    backend = "triton" if dev.type == "cuda" else "torch"
    shapes = [(512, 64, 4000), (1024, 64, 4000), (1024, 56, 5000)] if smoke else [
        (4096, 4096, 128256), (8192, 4096, 128256), (8192, 3584, 152064)]
    providers = ["gemm_floor", "ours", "torch_backend", "naive", "liger_triton"]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        providers.remove("liger_triton")
        st.note("liger_triton skipped: liger-kernel is not installed (carry the liger-kernel 0.8.5 wheel)")
    if dev.type != "cuda" and "liger_triton" in providers:
        providers.remove("liger_triton")
        st.note("liger_triton skipped: Triton kernels need CUDA")
    reps = 2 if smoke else 5
    loss_rows = []
    for n, d, v in shapes:
        g = torch.Generator(device=dev).manual_seed(1)
        hidden = (torch.randn(n, d, generator=g, device=dev) * 0.5).to(torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(v, d, generator=g, device=dev) / math.sqrt(d)).to(torch.bfloat16).requires_grad_(True)
        targets = torch.randint(0, v, (n,), generator=g, device=dev)
        adv = torch.randn(n, generator=g, device=dev)
        mask = torch.ones(n, device=dev)
        shape = f"N={n} D={d} V={v}"
        results = {}
        for p in providers:
            try:
                step = _provider_step(p, hidden, weight, targets, adv, mask, backend)
                _sync(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                ms = _time_ms(step, dev, reps=reps, warmup=1 if smoke else 2)
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
                results[p] = ms
                st.metric(shape, f"{p}_ms", ms, "ms")
                loss_rows.append({"provider": f"gpu_check:{p}", "N": n, "D": d, "V": v, "dtype": "bfloat16",
                                  "ms_median": round(ms, 3), "peak_mem_mb": round(peak, 1)})
            except torch.cuda.OutOfMemoryError as e:
                st.note(f"{p} at {shape}: out of memory ({str(e)[:80]})")
            except Exception as e:  # noqa: BLE001 - a peer that fails is a note, ours is a failure
                if p in ("ours", "gemm_floor"):
                    raise
                st.note(f"{p} at {shape} failed: {type(e).__name__}: {str(e)[:120]}")
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        floor = results.get("gemm_floor")
        ours = results.get("ours")
        st.check(f"{shape}: ours and the floor measured", floor is not None and ours is not None,
                 f"ours {ours:.2f} ms, floor {floor:.2f} ms" if floor and ours else "")
        if floor and ours:
            st.metric(shape, "ours_over_floor", ours / floor, "x", ok=ours / floor <= 1.10)
            if "liger_triton" in results:
                st.metric(shape, "liger_over_ours", results["liger_triton"] / ours, "x",
                          ok=results["liger_triton"] / ours >= 4.0)
            # Per-pass split of ours (one instrumented call after the timed ones).
            timed = _TimedOps(kernels._ops_for(backend), dev)
            chunk = kc.default_chunk_size(n, v, dev, torch.bfloat16)
            hidden.grad = weight.grad = None
            _sync(dev)
            t0 = time.perf_counter()
            kc.chunked_loss_and_grads(hidden.detach(), weight.detach(), targets, lambda r, lp: adv[r] / n,
                                      temperature=1.0, need_grad_hidden=True, need_grad_weight=True, ops=timed,
                                      grad_weight_dtype=torch.bfloat16)
            _sync(dev)
            total_ms = (time.perf_counter() - t0) * 1e3
            split = timed.split_ms()
            split["dH GEMM + loop"] = max(total_ms - sum(split.values()), 0.0)
            gemm_flops = 2 * n * d * v
            nbytes = {"row_stats": n * v * 4, "dlogits": n * v * (4 + 2)}
            for what, ms in split.items():
                st.metric(f"{shape} pass", f"{what}_ms", ms, "ms")
                if "GEMM" in what and what != "dH GEMM + loop":
                    st.metric(f"{shape} pass", f"{what}_tflops", gemm_flops / (ms * 1e-3) / 1e12, "TFLOP/s")
                if what in nbytes:
                    st.metric(f"{shape} pass", f"{what}_gbs", nbytes[what] / (ms * 1e-3) / 1e9, "GB/s")
                st.metric(f"{shape} pass", f"{what}_share_of_floor", ms / floor, "x floor")
            st.metric(shape, "chunk_size", chunk)
            line = ", ".join(f"{k} {v_:.2f}" for k, v_ in split.items())
            print(f"  {shape}: ours {ours:.2f} ms = {ours / floor:.2f}x floor ({floor:.2f} ms); passes: {line}")
        del hidden, weight
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if ceilings.get("gemm_tflops"):
        st.metric("ceilings", "gemm_tflops_stage0", ceilings["gemm_tflops"], "TFLOP/s")
    return loss_rows


# ------------------------------------------------------------------------------------------------
# Stage 4


def _qwen2_model(vocab, tied, smoke, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hidden = 64 if smoke else 1024
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + hidden // 2,
                      num_hidden_layers=2, num_attention_heads=4 if smoke else 16, num_key_value_heads=2 if smoke else 4,
                      max_position_embeddings=512, tie_word_embeddings=tied, rope_theta=10000.0,
                      use_sliding_window=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).float()
    model.config.use_cache = False
    return model


def _micro_batches(vocab, n_mb, rows, length, seed):
    from atropos_core.types import MicroBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_mb):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        targets = torch.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        lm = (torch.rand(rows, length, generator=g) > 0.3).float()
        lm[:, -1] = 0
        out.append(MicroBatch(input_ids=ids, targets=targets, loss_mask=lm, advantages=torch.randn(rows, length, generator=g),
                              attention_mask=torch.ones(rows, length, dtype=torch.int64),
                              position_ids=torch.arange(length).expand(rows, length).clone(),
                              old_logprobs=-4.0 + 0.3 * torch.randn(rows, length, generator=g), num_sequences=rows))
    return out


def _atropos_groups(vocab, n_groups, group_size, seed):
    import random

    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        prompt = [rng.randrange(1, vocab) for _ in range(24)]
        g = {"tokens": [], "masks": [], "scores": [], "advantages": None, "ref_logprobs": None,
             "inference_logprobs": []}
        for i in range(group_size):
            comp = [rng.randrange(1, vocab) for _ in range(rng.randint(8, 40))]
            g["tokens"].append(prompt + comp)
            g["masks"].append([-100] * len(prompt) + comp)
            g["scores"].append(rng.random() + i * 1e-3)
            g["inference_logprobs"].append([1.0] * len(prompt) + [-rng.uniform(0.1, 4.0) for _ in comp])
        groups.append(g)
    return groups


def stage4(st: Stage, dev, smoke: bool) -> None:
    import copy

    from atropos_core import dist as adist
    from atropos_core.batch import DataConfig, build_train_batch, split_for_ranks
    from atropos_core.checkpoint import save_checkpoint
    from atropos_core.loss import LossConfig
    from atropos_core.model import OptimConfig, apply_fsdp, build_optimizer
    from atropos_core.trainer import global_token_count, train_step

    vocab = 3000 if smoke else 128256
    backend = "triton" if dev.type == "cuda" else "torch"
    loss_cfg = LossConfig(loss_type="grpo", backend=backend)
    optim = OptimConfig(lr=1e-4, eps=1e-3, grad_clip=1.0)
    os.environ.pop("RANK", None)
    adist.init_distributed(dev.type, single_rank_group=True)  # what a plain CUDA process gets
    st.check("one-rank process group (plain process)", adist.is_dist() and adist.world_size() == 1)
    try:
        for tied in (False, True):
            name = "tied" if tied else "untied"
            base = _qwen2_model(vocab, tied, smoke)
            ref = copy.deepcopy(base).to(dev)
            sharded = apply_fsdp(copy.deepcopy(base).to(dev), dev, mixed_precision=True)
            mbs = _micro_batches(vocab, 2, 4 if smoke else 8, 33 if smoke else 257, seed=1)
            z = global_token_count(mbs)
            before = {n: p.detach().float().cpu().clone() for n, p in ref.named_parameters()}
            opt_r, _ = build_optimizer(ref, optim)
            opt_s, _ = build_optimizer(sharded, optim)
            # The fp32 reference process has no group (its gradients are not reduced): run it with
            # the torch backend in fp32; the FSDP one computes in bf16 with fp32 masters.
            m_r = train_step(ref, opt_r, None, mbs, LossConfig(loss_type="grpo", backend="torch"),
                             global_normalizer=z, grad_clip=optim.grad_clip)
            m_s = train_step(sharded, opt_s, None, mbs, loss_cfg, global_normalizer=z, grad_clip=optim.grad_clip)
            dtypes = {p.dtype for p in sharded.parameters()}
            st.check(f"{name}: fp32 master weights under FSDP", dtypes == {torch.float32}, str(dtypes))
            rel_loss = abs(m_s["loss/total"] - m_r["loss/total"]) / max(abs(m_r["loss/total"]), 1e-12)
            rel_norm = abs(m_s["grad/norm"] - m_r["grad/norm"]) / max(m_r["grad/norm"], 1e-12)
            # Updates: direction of (after - before), bf16 compute against fp32.
            num = den_s = den_r = 0.0
            for n_, p in sharded.named_parameters():
                full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                d_s = full - before[n_]
                d_r = dict(ref.named_parameters())[n_].detach().float().cpu() - before[n_]
                num += float((d_s * d_r).sum())
                den_s += float((d_s * d_s).sum())
                den_r += float((d_r * d_r).sum())
            cos = num / max(math.sqrt(den_s * den_r), 1e-30)
            st.metric(f"fsdp1 {name}", "loss_rel_diff", rel_loss)
            st.metric(f"fsdp1 {name}", "grad_norm_rel_diff", rel_norm)
            st.metric(f"fsdp1 {name}", "update_cosine", cos)
            st.check(f"{name}: bf16 FSDP step matches fp32 (loss, grad norm, update direction)",
                     rel_loss < 2e-2 and rel_norm < 5e-2 and cos > 0.98 and m_s["train/skipped_nonfinite"] == 0,
                     f"loss {rel_loss:.1e}, grad norm {rel_norm:.1e}, update cosine {cos:.4f}")
            del ref, sharded, opt_r, opt_s
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        # The driver's step loop in process: groups -> batch -> rank split -> train_step -> checkpoint.
        model = apply_fsdp(_qwen2_model(vocab, False, smoke).to(dev), dev, mixed_precision=True)
        opt, sched = build_optimizer(model, optim)
        data = DataConfig(vocab_size=vocab, max_token_len=512, max_tokens_per_micro_batch=2048)
        losses = []
        for step in range(1, 4):
            batch = build_train_batch(_atropos_groups(vocab, 4, 8, seed=step), data)
            mine = split_for_ranks(batch.micro_batches, 1)[0]
            t0 = time.perf_counter()
            m = train_step(model, opt, sched, mine, loss_cfg, global_normalizer=batch.total_trained_tokens,
                           grad_clip=optim.grad_clip)
            losses.append(m["loss/total"])
            print(f"  step {step}: loss {m['loss/total']:.4f} grad {m['grad/norm']:.3f} tokens {m['train/tokens']:.0f} "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms mem {m['perf/mem_gb']:.2f} GB")
            st.metric("driver loop", f"step{step}_tokens_per_s", m["perf/train_tokens_per_s"])
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "ck", 3, model, opt, sched)
            saved = (Path(path) / "model.safetensors").exists() or any(Path(path).rglob("*.safetensors"))
        st.check("driver loop: 3 steps finite, checkpoint saved", all(math.isfinite(x) for x in losses) and saved,
                 f"losses {[round(x, 4) for x in losses]}")
    finally:
        adist.cleanup()
    _driver_run(st, dev, vocab, smoke)


def _driver_run(st: Stage, dev, vocab: int, smoke: bool, steps: int = 3) -> None:
    """`drivers/train.py` itself as a child process on `dev` with synthetic batches (`--atropos-url
    synthetic`: no API, vLLM or environment), on a Qwen2-shaped model saved here with a local
    tokenizer: exit 0, `steps` finite rows in metrics.jsonl, the synthetic-data line once, and the
    final checkpoint."""
    from atropos_core.checkpoint import find_latest
    from atropos_core.envs.tiny_model import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "run"
        tok = build_tokenizer(model_dir)
        model = _qwen2_model(vocab, False, smoke)
        model.config.pad_token_id = model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(str(model_dir), safe_serialization=True)
        del model
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT", "TRITON_INTERPRET")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if dev.type == "cuda":  # the child sees only this GPU, as its cuda:0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            idx = dev.index or 0
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[idx] if visible else str(idx)
        cmd = [sys.executable, str(ROOT / "drivers" / "train.py"), "--model", str(model_dir),
               "--atropos-url", "synthetic", "--steps", str(steps), "--out", str(out),
               "--max-token-len", "64" if smoke else "512", "--atropos.batch_size", "16" if smoke else "64",
               "--atropos.group_size", "8", "--checkpoint.every", "0", "--logging.plot_every", "0",
               "--run.device", dev.type]
        print("  " + " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        wall = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        for line in proc.stdout.splitlines():
            if line.startswith("step "):
                print("  " + line, flush=True)
        ok = st.check("driver: drivers/train.py --atropos-url synthetic exits 0", proc.returncode == 0,
                      f"exit {proc.returncode} after {wall:.0f} s" + ("" if proc.returncode == 0 else
                                                                    "; log tail:\n" + log[-3000:]))
        st.metric("driver synthetic", "wall_s", wall, "s")
        if not ok:
            return
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [r.get("loss/total") for r in rows]
        st.check(f"driver: {steps} rows in metrics.jsonl, finite loss", [r.get("step") for r in rows] ==
                 list(range(1, steps + 1)) and all(isinstance(x, float) and math.isfinite(x) for x in losses),
                 f"losses {[round(x, 4) if isinstance(x, float) else x for x in losses]}")
        st.check("driver: says once that the data is synthetic", log.count("SYNTHETIC batches") == 1)
        latest = find_latest(out / "checkpoints")
        st.check("driver: final checkpoint saved", latest is not None and latest.name == f"step-{steps:08d}",
                 str(latest))
        if rows:
            st.metric("driver synthetic", "last_step_tokens_per_s", rows[-1].get("perf/tokens_per_s", float("nan")))


# ------------------------------------------------------------------------------------------------


class StageTimeout(Exception):
    pass


def _stage_timeout(signum, frame):
    raise StageTimeout("stage ran past --stage-timeout")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that the script runs")
    ap.add_argument("--stages", default="0,1,2,3,4", help="comma-separated stage numbers")
    ap.add_argument("--device", default=None, help="default: cuda:0, or cpu with --smoke")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results",
                    help="where gpu_check.csv, loss.csv and gpu_check/<run>.json go")
    ap.add_argument("--commit", default=None,
                    help="commit to stamp on the rows when this copy has no .git (default: git rev-parse)")
    ap.add_argument("--stage-timeout", type=float, default=300.0,
                    help="seconds one stage may take before it fails (and the next one starts)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.smoke else "cuda:0"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --smoke on CPU)", file=sys.stderr)
            return 2
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    meta = run_meta(str(dev))
    if args.commit:
        meta["commit"] = args.commit
    print(f"gpu_check on {meta['device']} at {meta['commit']} ({'smoke' if args.smoke else 'full'})", flush=True)
    t_all = time.perf_counter()
    results, ceilings, loss_rows = [], {}, []
    fns = {0: "versions and ceilings", 1: "kernel correctness vs fp64", 2: "memory and host syncs",
           3: "loss benchmark", 4: "FSDP2 on one GPU and the driver loop"}
    for num in stages:
        st = Stage(num, fns[num])
        print(f"stage {num}: {st.title}", flush=True)
        signal.signal(signal.SIGALRM, _stage_timeout)
        signal.alarm(max(1, int(args.stage_timeout)))
        try:
            if num == 0:
                ceilings = stage0(st, dev, args.smoke)
            elif num == 1:
                stage1(st, dev, args.smoke)
            elif num == 2:
                stage2(st, dev, args.smoke)
            elif num == 3:
                loss_rows = stage3(st, dev, args.smoke, ceilings)
            elif num == 4:
                stage4(st, dev, args.smoke)
        except Exception as e:  # noqa: BLE001 - a crashed stage fails alone; the others still run
            st.error = f"{type(e).__name__}: {e}"
            print(f"  [FAIL] stage {num} crashed:\n{traceback.format_exc()}", flush=True)
        finally:
            signal.alarm(0)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results.append(st.result())
        print(f"stage {num}: {st.status.upper()} ({st.result()['seconds']} s, "
              f"{sum(c['ok'] for c in st.checks)}/{len(st.checks)} checks)", flush=True)
    total_s = time.perf_counter() - t_all
    out = {**meta, "smoke": args.smoke, "seconds": round(total_s, 1), "stages": results,
           "ok": all(r["status"] != "fail" for r in results)}
    rd = args.results_dir
    (rd / "gpu_check").mkdir(parents=True, exist_ok=True)
    json_path = rd / "gpu_check" / f"{meta['date'][:19].replace(':', '')}-{meta['commit']}{'-smoke' if args.smoke else ''}.json"
    json_path.write_text(json.dumps(out, indent=1, default=str))
    rows = [{**meta, **r} for res in results for r in res["rows"]]
    rows += [{**meta, "stage": res["stage"], "case": c["case"], "metric": "check", "value": "", "unit": "",
              "ok": int(c["ok"])} for res in results for c in res["checks"]]
    rows += [{**meta, "stage": res["stage"], "case": "stage", "metric": "status", "value": res["status"],
              "unit": "", "ok": int(res["status"] != "fail")} for res in results]
    append_rows(rd / "gpu_check.csv", CSV_FIELDS, rows)
    if loss_rows:
        append_rows(rd / "loss.csv", LOSS_FIELDS, [{**meta, **r} for r in loss_rows])
    print("\nsummary")
    for r in results:
        bad = [c["case"] for c in r["checks"] if not c["ok"]]
        print(f"  stage {r['stage']} {r['title']:<40} {r['status'].upper():<5} {r['seconds']:>6.1f} s"
              + (f"  failed: {'; '.join(bad)[:200]}" if bad else "") + (f"  error: {r['error'][:200]}" if r["error"] else ""))
    print(f"total {total_s:.0f} s; results: {json_path} and {rd / 'gpu_check.csv'}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
