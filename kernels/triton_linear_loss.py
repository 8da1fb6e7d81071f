"""Triton backend of the fused linear policy loss: the row-wise passes and the fp32 dW GEMM.

The chunk loop lives in `kernels.chunked.chunked_loss_and_grads`; this file supplies its four
operations (`TritonOps`) for one chunk of C tokens, logits `z = h_c @ W.T` of shape `(C, V)`:

    logits        z = h_c @ W.T, fp32                    torch.mm(out_dtype=fp32) (cuBLAS, fp32 output)
    row_stats     x = z / T,  lse = logsumexp(x),  logp = x[t] - lse,
                  H = lse - sum softmax(x) * x           one read of z:  C*V*4 bytes
    row_logprobs  lse and logp only (ENTROPY=False)      the same read, no entropy sums (GSPO pass 1)
    dlogits       dZ = g/T * (onehot(t) - exp(x - lse))  one read of z, one write of dZ (C*V*b;
                                                         in place when b = 4)
    accumulate_dw dW[v, d] += sum_c dZ[c, v] * h_c[c, d] 2*C*V*D FLOPs, fp32 accumulator;
                                                         dW read + written once: 8*V*D bytes

(b = bytes per element of the input dtype, T = temperature, g = dL/dlogp from `kernels.losses`).

`_row_stats_kernel` is one program per row; it walks the vocabulary in BLOCK_V tiles with an
online softmax (Milakov & Gimelshein 2018, arXiv:1805.02867): a running max m, the running sum
s = sum exp(x - m) and, for the entropy, w = sum exp(x - m) * (x - m), all rescaled when m grows.
Keeping w relative to m (rather than sum p*x) avoids cancelling two numbers of size lse:
H = log s - w / s. Nothing but three floats per row is written; the softmax is recomputed in
`_dlogits_kernel` from the saved lse, so the only `[C, V]` buffer is the logits chunk itself,
which dZ overwrites. The `[N, V]` logits are never materialised.

`_accumulate_dw_kernel` is a plain tiled GEMM; it exists because the torch route,
`dw += (dZ.T @ h_c).float()`, rounds each chunk's product to bf16 and allocates a `(V, D)`
temporary per chunk. Here each program owns one BLOCK_V x BLOCK_D tile of dW, accumulates
`tl.dot` over the chunk's tokens in an fp32 register tile and adds it to dW once: no atomics,
no bf16 accumulation (Liger's fused linear CE accumulated dW in bf16: its known divergence).
Its read-modify-write of the fp32 dW costs 8*V*D bytes per chunk against 2*C*V*D FLOPs, C/4 FLOP
per byte: compute-bound on an H100 (~240 FLOP/byte) once C passes ~1000 tokens, which the CUDA
chunk budget of `kernels.chunked` (C = 2048 at V = 128k) does.

All maths is fp32 whatever the input dtype; row offsets are int64 (C * V passes 2^31 at
C = 16384, V = 131072); the vocabulary tail is masked, so no size needs to be a multiple of a
block. Block sizes and warp counts come from `launch_config`, the one heuristic (compiled offline
for sm_90 and sm_80 by `bench/compile_report.py`, which checks registers, spills and shared memory).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .chunked import TorchOps

# Running max before the first tile: finite, so that `s * (m_old - m_new)` is 0 * finite, not
# 0 * inf = NaN, and far below any logit an fp16/bf16/fp32 GEMM can produce.
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _row_stats_kernel(
    z_ptr, stride_z_row,
    tgt_ptr,
    lse_ptr, logp_ptr, ent_ptr,
    V, inv_t,
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr = True,
):
    # ENTROPY=False: lse and logp only (the logprob-only first pass); ent_ptr is not written.
    row = tl.program_id(0).to(tl.int64)
    z_row_ptr = z_ptr + row * stride_z_row
    cols = tl.arange(0, BLOCK_V)
    m = _M_INIT
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(z_row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)                      # 0 on masked lanes
        if ENTROPY:
            xm = tl.where(mask, x - m_new, 0.0)    # avoid 0 * -inf on masked lanes
            # Rescale the old sums to the new max: sum e^(x-m_old) (x-m_old) -> relative to m_new.
            w = alpha * (w + s * (m - m_new)) + tl.sum(e * xm, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    t = tl.load(tgt_ptr + row).to(tl.int64)
    x_t = tl.load(z_row_ptr + t).to(tl.float32) * inv_t
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x_t - lse)
    if ENTROPY:
        tl.store(ent_ptr + row, log_s - w / s)


@triton.jit
def _dlogits_kernel(
    z_ptr, stride_z_row,
    dz_ptr, stride_dz_row,
    lse_ptr, tgt_ptr, coef_ptr,
    V, inv_t,
    BLOCK_V: tl.constexpr,
):
    # Grid (C, cdiv(V, BLOCK_V)): each program reads and writes only its own tile, so dz_ptr
    # may alias z_ptr (in place).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    x = tl.load(z_ptr + row * stride_z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
    lse = tl.load(lse_ptr + row)
    t = tl.load(tgt_ptr + row).to(tl.int64)
    c = tl.load(coef_ptr + row) * inv_t
    cp = c * tl.exp(x - lse)
    dz = tl.where(offs == t, c - cp, -cp)
    tl.store(dz_ptr + row * stride_dz_row + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_dw_kernel(
    dw_ptr, stride_dw_v, stride_dw_d,
    out_ptr, stride_out_v, stride_out_d,
    dz_ptr, stride_dz_c, stride_dz_v,
    h_ptr, stride_h_c, stride_h_d,
    C, V, D,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LOAD_DW: tl.constexpr,
):
    # out = (dw if LOAD_DW else 0) + dz.T @ h; out may be dw itself (accumulate in place) or the
    # weight-dtype gradient (last chunk: the cast fused into the final store).
    # d varies fastest across program ids: neighbouring programs share the same dZ columns, and
    # all of h_c (C x D, a few MiB) stays in L2 while the grid sweeps the vocabulary.
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    pid_v = pid // n_d
    pid_d = pid % n_d
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_v = offs_v < V
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        # Tail rows and columns load as 0, which adds nothing to the dot product.
        a = tl.load(dz_ptr + offs_c[:, None] * stride_dz_c + offs_v[None, :] * stride_dz_v,
                    mask=mask_c[:, None] & mask_v[None, :], other=0.0)
        b = tl.load(h_ptr + offs_c[:, None] * stride_h_c + offs_d[None, :] * stride_h_d,
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    mask = mask_v[:, None] & mask_d[None, :]
    if LOAD_DW:
        acc += tl.load(dw_ptr + offs_v[:, None] * stride_dw_v + offs_d[None, :] * stride_dw_d, mask=mask, other=0.0)
    out_ptrs = out_ptr + offs_v[:, None] * stride_out_v + offs_d[None, :] * stride_out_d
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def launch_config(kernel: str, *, vocab: int, dim: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes, warps and pipeline stages for `kernel` ("row_stats", "dlogits", "accumulate_dw").

    Why these numbers:
    - row_stats / dlogits are memory-bound passes over a `(C, V)` chunk. A 4096-wide tile (8 KiB in
      bf16) gives each of 8 warps 16 elements per thread: two 16-byte vector loads in flight, few
      registers, and only ~32-38 loop trips (or programs per row) at V = 128k-152k. Small
      vocabularies use one power-of-two tile with fewer warps so no warp idles on masked lanes.
    - accumulate_dw is a GEMM with an fp32 128 x 128 register tile: at 8 warps that is 64
      accumulator registers per thread and no spills on sm_80 and sm_90, where the same tile at 4
      warps hits the 255-register cap and spills (tests/test_compile_report.py compiles that
      config as its known-bad control). BLOCK_C = 64 in 16-bit
      (32 in fp32) with 3 stages keeps the operand ring at 96 KiB of shared memory, inside both
      sm_80's 163 KiB and sm_90's 227 KiB. fp32 uses IEEE dots (torch's default; TF32 would be a
      10-bit-mantissa surprise). Small D or V shrink the tile to the next power of two (>= 16, the
      smallest `tl.dot` operand).
    `bench/compile_report.py` compiles every config this returns for realistic shapes and fails on
    a spill or a shared-memory overrun; change both together.
    """
    if kernel in ("row_stats", "dlogits"):
        block_v = min(4096, triton.next_power_of_2(max(vocab, 16)))
        return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4, "num_stages": 2}
    if kernel == "accumulate_dw":
        wide = dtype in (torch.float32, torch.float64)
        return {
            "BLOCK_C": 32 if wide else 64,
            "BLOCK_V": min(128, max(16, triton.next_power_of_2(vocab))),
            "BLOCK_D": min(128, max(16, triton.next_power_of_2(dim))),
            "DOT_PRECISION": "ieee" if wide else "tf32",  # ignored by tl.dot for 16-bit inputs
            "num_warps": 8,
            "num_stages": 3,
        }
    raise ValueError(f"kernel must be row_stats, dlogits or accumulate_dw, got {kernel!r}")


def _split(config: dict):
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return meta, config.get("num_warps", 4), config.get("num_stages", 2)


def _check_rows(z: torch.Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits chunk must be 2-D with unit column stride, got shape {tuple(z.shape)} "
                         f"strides {z.stride()}")


def _launch_row_stats(z: torch.Tensor, targets: torch.Tensor, inv_t: float, config: Optional[dict],
                      entropy: bool) -> torch.Tensor:
    """`(3, C)` fp32 `[lse, logp, entropy]` (`(2, C)` without the entropy sums) of `z` `(C, V)`."""
    _check_rows(z)
    c, v = z.shape
    cfg = config or launch_config("row_stats", vocab=v, dtype=z.dtype)
    meta, warps, stages = _split(cfg)
    out = torch.empty(3 if entropy else 2, c, dtype=torch.float32, device=z.device)
    if c:
        _row_stats_kernel[(c,)](z, z.stride(0), targets.contiguous(), out[0], out[1], out[-1], v, float(inv_t),
                                ENTROPY=entropy, num_warps=warps, num_stages=stages, **meta)
    return out


def row_stats(z: torch.Tensor, targets: torch.Tensor, inv_t: float, *, config: Optional[dict] = None):
    """`(lse, logp, entropy)`, each `(C,)` fp32, of `softmax(z * inv_t)` for `z` `(C, V)`."""
    out = _launch_row_stats(z, targets, inv_t, config, entropy=True)
    return out[0], out[1], out[2]


def row_logprobs(z: torch.Tensor, targets: torch.Tensor, inv_t: float, *, config: Optional[dict] = None):
    """`(lse, logp)`, each `(C,)` fp32: `row_stats` without the entropy sums (`ENTROPY=False`)."""
    out = _launch_row_stats(z, targets, inv_t, config, entropy=False)
    return out[0], out[1]


def dlogits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, inv_t: float,
            dtype: torch.dtype, *, config: Optional[dict] = None) -> torch.Tensor:
    """`coef * inv_t * (onehot(t) - softmax(z * inv_t))` in `dtype`, over `z` when it has that dtype."""
    _check_rows(z)
    c, v = z.shape
    out = z if z.dtype == dtype else torch.empty(c, v, dtype=dtype, device=z.device)
    cfg = config or launch_config("dlogits", vocab=v, dtype=dtype)
    meta, warps, stages = _split(cfg)
    coef = coef.to(torch.float32).contiguous()
    if c:
        grid = (c, triton.cdiv(v, meta["BLOCK_V"]))
        _dlogits_kernel[grid](z, z.stride(0), out, out.stride(0), lse.contiguous(), targets.contiguous(), coef, v,
                              float(inv_t), num_warps=warps, num_stages=stages, **meta)
    return out


def accumulate_dw(dw: Optional[torch.Tensor], dz: torch.Tensor, h_c: torch.Tensor, *, first: bool = False,
                  out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> None:
    """`dw += dz.T @ h_c` with an fp32 accumulator; dw `(V, D)` fp32, dz `(C, V)`, h_c `(C, D)`.

    `first`: `dw = dz.T @ h_c`, dw's old contents never read (no zero fill needed). `out` `(V, D)`
    in any float dtype: the result goes there (cast in the store) instead of into dw; dw may then
    be None when `first` (a single chunk needs no fp32 buffer)."""
    if dz.dtype != h_c.dtype:
        raise ValueError(f"dz and h_c must share a dtype, got {dz.dtype} and {h_c.dtype}")
    if dw is None and (out is None or not first):
        raise ValueError("accumulate_dw: dw may be None only with first=True and an out tensor")
    if dw is not None and dw.dtype != torch.float32:
        raise ValueError(f"dw must be float32, got {dw.dtype}")
    c, v = dz.shape
    d = h_c.shape[1]
    for name, t in (("dw", dw), ("out", out)):
        if t is not None and (t.shape != (v, d) or h_c.shape[0] != c):
            raise ValueError(f"shapes do not chain: {name} {tuple(t.shape)}, dz {tuple(dz.shape)}, h_c {tuple(h_c.shape)}")
    dst = out if out is not None else dw
    src = dw if dw is not None else dst
    cfg = config or launch_config("accumulate_dw", vocab=v, dim=d, dtype=dz.dtype)
    meta, warps, stages = _split(cfg)
    if c:
        grid = (triton.cdiv(v, meta["BLOCK_V"]) * triton.cdiv(d, meta["BLOCK_D"]),)
        _accumulate_dw_kernel[grid](src, src.stride(0), src.stride(1), dst, dst.stride(0), dst.stride(1),
                                    dz, dz.stride(0), dz.stride(1), h_c, h_c.stride(0), h_c.stride(1), c, v, d,
                                    LOAD_DW=not first, num_warps=warps, num_stages=stages, **meta)
    elif first:
        dst.zero_()
    elif out is not None:
        out.copy_(dw)


# ---------------------------------------------------------------------------------------------
# The backend the chunk loop calls


class TritonOps(TorchOps):
    """The chunk operations of `kernels.chunked.TorchOps`, with Triton kernels for the three that
    are not a plain GEMM (`logits` stays torch's / cuBLAS's matmul, inherited).

    `row_stats` hands the untouched logits chunk on as `buf`; `dlogits` recomputes the softmax
    from it and the saved lse and overwrites it with dZ. float64 inputs (a debugging dtype)
    take the torch path for the dW GEMM, which `tl.dot` does not cover on every target.
    """

    name = "triton"
    direct_dw_out = True

    @staticmethod
    def row_stats(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        lse, logp, entropy = row_stats(z, targets, inv_t)
        return lse, logp, entropy, z

    @staticmethod
    def row_logprobs(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        return row_logprobs(z, targets, inv_t)

    @staticmethod
    def dlogits(buf: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, inv_t: float,
                dtype) -> torch.Tensor:
        return dlogits(buf, lse, targets, coef, inv_t, dtype)

    @staticmethod
    def accumulate_dw(dw: Optional[torch.Tensor], dz: torch.Tensor, h_c: torch.Tensor, *, first: bool = False,
                      out: Optional[torch.Tensor] = None) -> None:
        if dz.dtype == torch.float64:
            TorchOps.accumulate_dw(dw, dz, h_c, first=first, out=out)
        else:
            accumulate_dw(dw, dz, h_c, first=first, out=out)
