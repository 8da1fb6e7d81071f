"""Chunked linear → log-softmax → token loss, with the gradient computed in the forward pass.

Maths. For the selected tokens (mask != 0; masked tokens are dropped *before* any GEMM: Atropos
prompts are masked, often half the tokens), in chunks of C tokens:

    z   = h_c @ W.T                    (C, V)   2·C·D·V FLOPs  (GEMM, fp32 output: see below)
    lse = logsumexp(z / T),  logp = z[t]/T - lse,  H = lse - Σ softmax(z/T)·z/T
    g   = dL/dlogp                     (C,)     from kernels.losses (token-local)
    dZ  = g/T · (onehot(t) - softmax(z/T))      written over the logits buffer
    dH_c = dZ @ W                      (C, D)   2·C·D·V FLOPs  (GEMM)
    dW  += dZ.T @ h_c                  (V, D)   2·C·D·V FLOPs  (GEMM, fp32 accumulator)

so forward+backward is 6·N·D·V FLOPs and the autograd backward only scales the saved gradients by
the incoming scalar. Never materialised: the `[N, V]` logits. Peak extra memory on the torch path:
one `[C, V]` fp32 buffer, a `ENTROPY_BLOCK_BYTES` scratch and the fp32 `[V, D]` weight gradient,
independent of N.

The measured trade-offs (extra peak against the naive loss, CPU time against the three plain
GEMMs, the chunk-size sweep, what the in-place row operations saved) are in docs/kernels.md and
bench/results/loss.csv. Small chunks cost time because each one rereads all of dW
(`dW += dZ.T @ h_c`); the row operations work in place on the logits buffer.

`linear_logprobs` returns a per-token vector, whose incoming gradient is only known in backward:
it saves `lse` (N floats) and recomputes each chunk's logits there (8·N·D·V in all).

Logits are fp32 whatever the inputs' dtype (`mm_fp32`: cuBLAS with an fp32 output on CUDA, fp32
products of upcast blocks on CPU). A bf16 logit at |z| = 16-32 carries up to half an ulp, 0.0625,
and logp inherits it whole: ratio noise of ~5% against a 0.2 clip. The price is a 4-byte chunk
buffer (plus a 2-byte dZ), which `default_chunk_size` budgets from the real element sizes.

Host syncs: none in the loop (chunk bounds come from shapes). `kernels.fused_linear_policy_loss`
with `validate=False, num_selected=k` and a float normalizer adds none either.

The loop is shared by both backends; a backend supplies the four row-wise operations of
`TorchOps` (the Triton backend, `kernels/triton_linear_loss.py`, fuses each into one kernel).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Bytes of chunk buffers (the fp32 logits, plus dZ when it has another dtype) one chunk may hold.
# CPU: 64 MiB (512 rows at V=32768 in fp32) keeps the extra peak a small fraction of naive's and
# sits on the flat part of the chunk sweep (docs/kernels.md). CUDA: 1.5 GiB, i.e. ~2000 rows at V=128k-152k in bf16 (4 + 2 bytes per logit): each
# chunk rereads and rewrites the fp32 dW once, so fewer chunks are fewer of those passes, and
# dW (2.1 GB at V=128256, D=4096) + 1.5 GiB stays inside the 4.5 GB extra-peak target.
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 3 << 29
# Scratch for TorchOps' entropy pass: a few hundred rows of V at most, reused across row blocks.
ENTROPY_BLOCK_BYTES = 16 << 20
# Rows of a chunk are a multiple of this (tensor-core tiles are 16 or 64 rows; no power-of-two floor).
CHUNK_ROW_MULTIPLE = 16
# Block of weight rows (or dZ columns) upcast at once where no fp32-output GEMM exists for 16-bit inputs.
UPCAST_BLOCK_BYTES = 8 << 20


def chunk_bytes_per_row(vocab: int, dtype: torch.dtype) -> int:
    """Bytes one chunk row holds: fp32 logits, plus a dZ row when dZ (the inputs' dtype) is not fp32."""
    dz = 0 if dtype in (torch.float32, torch.float64) else torch.empty((), dtype=dtype).element_size()
    return max(vocab, 1) * (4 + dz)


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per chunk: as many as the device's budget holds (`chunk_bytes_per_row`), then evened
    out over the chunks that N needs (N=8192 in 4 chunks of 2048, not 3 of 2176 and one of 1664),
    in multiples of `CHUNK_ROW_MULTIPLE`. The result depends only on Python ints (no host sync)."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    n = max(n_tokens, 1)
    c_max = max(CHUNK_ROW_MULTIPLE, budget // chunk_bytes_per_row(vocab, dtype))
    chunks = -(-n // c_max)
    c = -(-n // chunks)                                   # even split, still <= c_max rows
    if chunks > 1 and c > CHUNK_ROW_MULTIPLE:
        up = -(-c // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
        c = up if up <= c_max else c // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(c, n))


_FP32_OUT_MM: dict = {}


def fp32_out_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for `dtype` inputs on `device`.

    It does on CUDA from torch 2.8 (cuBLAS with an fp32 output, the accumulator never rounded to
    the input dtype); the CPU build has no kernel for it (torch 2.13: NotImplementedError). Probed
    once per (device type, dtype) with a 1x1 product; the probe launches a tiny kernel, no sync."""
    key = (device.type, dtype)
    if key not in _FP32_OUT_MM:
        try:
            a = torch.zeros(1, 1, dtype=dtype, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _FP32_OUT_MM[key] = True
        except (NotImplementedError, RuntimeError, TypeError):
            _FP32_OUT_MM[key] = False
    return _FP32_OUT_MM[key]


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with an fp32 result that was never rounded to the inputs' 16-bit dtype.

    fp32/fp64 inputs: a plain `torch.mm` (fp64 stays fp64). 16-bit inputs: `torch.mm(...,
    out_dtype=torch.float32)` where the device has it (CUDA), else the product over column blocks
    of `b` upcast to fp32 (exact: a product of two bf16/fp16 values fits an fp32 mantissa, so the
    only rounding left is fp32 accumulation), holding at most `UPCAST_BLOCK_BYTES` of upcast `b`."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if fp32_out_mm_supported(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    k, m = b.shape
    out = torch.empty(a.shape[0], m, dtype=torch.float32, device=a.device)
    a32 = a.float()
    step = max(64, UPCAST_BLOCK_BYTES // (4 * max(k, 1)))
    for j in range(0, m, step):
        torch.mm(a32, b[:, j:j + step].float(), out=out[:, j:j + step])
    return out


class TorchOps:
    """Row-wise operations over one chunk of logits, in plain torch (any device).

    One `[C, V]` fp32 buffer per chunk: the logits are turned into log-probabilities in place
    (`log_softmax(out=z)`, one fused pass), then into probabilities in place, and `dlogits` scales
    that same buffer into dZ. The entropy dot `-Σ p·log p` needs both views at once, so it runs
    over row blocks through one small `ENTROPY_BLOCK_BYTES` scratch (exp into scratch, row dot,
    copy back) instead of a second `[C, V]` buffer. See the module docstring for measurements.
    """

    name = "torch"

    # Whether accumulate_dw may be handed `dw=None` with `first=True` and write `out` directly.
    direct_dw_out = False

    @staticmethod
    def logits(h_c: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`h_c @ weight.T` as fp32 (fp64 for fp64 inputs): never rounded to a 16-bit dtype, whose
        half-ulp at |z| = 16-32 (0.03-0.06 in bf16) would go straight into logp (`mm_fp32`).
        `out`: an fp32 `(C, V)` buffer to write into (fp32 inputs only; otherwise ignored)."""
        if out is not None and h_c.dtype == torch.float32 and weight.dtype == torch.float32:
            return torch.mm(h_c, weight.t(), out=out)
        return mm_fp32(h_c, weight.t())

    @staticmethod
    def row_stats(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        """`(lse, logp, entropy, buf)`: the first three (C,) fp32 for softmax(z·inv_t); `buf` is
        whatever this backend hands on to `dlogits` (here: the probabilities). May overwrite z."""
        z, lse, logp = TorchOps._log_softmax_rows(z, targets, inv_t)
        c, v = z.shape
        entropy = torch.empty(c, dtype=torch.float32, device=z.device)
        r = max(1, min(c, ENTROPY_BLOCK_BYTES // (4 * max(v, 1))))
        scratch = torch.empty(r, v, dtype=torch.float32, device=z.device)
        for s in range(0, c, r):
            logp_b = z[s:s + r]
            p_b = scratch[:logp_b.shape[0]]
            torch.exp(logp_b, out=p_b)
            entropy[s:s + r] = torch.bmm(p_b.unsqueeze(1), logp_b.unsqueeze(2)).view(-1)
            logp_b.copy_(p_b)                        # the buffer now holds probabilities
        return lse, logp, entropy.neg_(), z

    @staticmethod
    def row_logprobs(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        """`(lse, logp)`, each (C,) fp32, of softmax(z·inv_t): `row_stats` without the entropy and
        probability pass (the first pass of GSPO / sequence-level IS needs only logp). May overwrite z."""
        return TorchOps._log_softmax_rows(z, targets, inv_t)[1:]

    @staticmethod
    def _log_softmax_rows(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        """`(z, lse, logp)`: the fp32 chunk turned into log_softmax(z·inv_t) in place (a copy where
        z was not fp32), and the (C,) log-sum-exp and target logprobs."""
        z = z.float() if z.dtype != torch.float32 else z.contiguous()
        if inv_t != 1.0:
            z.mul_(inv_t)
        rows = torch.arange(z.shape[0], device=z.device)
        z_t = z[rows, targets]
        # In place: log_softmax works row by row (max, sum of exp, then write), so out=z is safe;
        # it replaces logsumexp + subtract + a [C, V] temporary (docs/kernels.md: the largest
        # non-GEMM cost on CPU).
        torch.log_softmax(z, 1, out=z)
        logp = z[rows, targets]
        return z, z_t - logp, logp  # lse rounding ~eps·|logp|: the error logp itself carries

    @staticmethod
    def dlogits(p: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, inv_t: float,
                dtype) -> torch.Tensor:
        """dZ = coef·inv_t·(onehot(t) - softmax), written over `buf` (here p, so `lse` is unused);
        returned in `dtype`, the dtype of the GEMMs that consume it."""
        c = coef.to(p.dtype) * inv_t
        p.mul_(-c.unsqueeze(1))
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, targets] += c
        return p if p.dtype == dtype else p.to(dtype)

    @staticmethod
    def accumulate_dw(dw: Optional[torch.Tensor], dz: torch.Tensor, h_c: torch.Tensor, *, first: bool = False,
                      out: Optional[torch.Tensor] = None) -> None:
        """dw (fp32, (V, D)) += dz.T @ h_c; `first`: dw = dz.T @ h_c (dw's old contents, e.g. from
        `torch.empty`, are never read, so no zero fill). `out` (the weight's dtype): also write the
        result there, cast (the last chunk). 16-bit dz: the product is rounded to that dtype before
        the fp32 sum except where `fp32_out_mm_supported` (the Triton backend never rounds it)."""
        if dz.dtype in (torch.float32, torch.float64):
            if dw is None:
                prod = torch.mm(dz.t(), h_c.to(dz.dtype))
            elif first:
                torch.mm(dz.t(), h_c.to(dz.dtype), out=dw)
            else:
                dw.addmm_(dz.t(), h_c.to(dz.dtype))
        else:
            prod = (torch.mm(dz.t(), h_c, out_dtype=torch.float32) if fp32_out_mm_supported(dz.device, dz.dtype)
                    else torch.mm(dz.t(), h_c).float())
            if dw is not None:
                dw.copy_(prod) if first else dw.add_(prod)
        if out is not None:
            out.copy_(dw if dw is not None else prod)


def chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coef_fn: Callable[..., object],
    *,
    temperature,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    ops=TorchOps,
    chunk_size: Optional[int] = None,
    grad_weight_dtype: torch.dtype = torch.float32,
    gather_ids: Optional[torch.Tensor] = None,
    logprobs_only: bool = False,
):
    """Run the chunk loop over all rows of `hidden` (already restricted to selected tokens).

    `coef_fn(rows, logp_chunk)` returns the (C,) fp32 coefficient `dL/dlogp` for those rows (it
    may also record loss terms). Returns `(logp, entropy, grad_hidden, grad_weight)`; gradients are
    None when not requested. grad_weight is accumulated in fp32 and returned in `grad_weight_dtype`
    (the cast fused into the last chunk's accumulation; one chunk in a 16-bit dtype on the Triton
    backend never allocates the fp32 buffer at all).

    Per chunk: logits `(C, V)` fp32 (`ops.logits`), `ops.row_stats`, `coef_fn`, `ops.dlogits` into
    dZ of the inputs' dtype, `dH = dZ @ W` written into its rows of grad_hidden, and
    `ops.accumulate_dw(dw, dZ, h_c, first=..., out=...)`. The loop itself reads nothing back to the
    host: chunk bounds are Python ints from the shapes.

    `temperature`: a float, or an `(n,)` tensor of per-row temperatures: the chunk's fp32 logits
    are then scaled row by row in place (one pass over the chunk) and the row-wise ops run at
    temperature 1, with the 1/T_i of dZ folded into the coefficients.
    `gather_ids`: `(n, k)` vocabulary ids (distillation). Then `coef_fn(rows, logp_chunk, extra)`
    gets `extra = (logp_k (C, k) log-softmax at those ids, is_max (C, k) bool: the id holds the
    row's largest logit)` and returns `g` or `(g, d_xk, d_p)`: the derivative with respect to the k
    tempered logits besides a `d_p (C,) · softmax(x)` part over the whole row (None: 0). They go
    into dZ as `(g - d_p)(onehot(t) - p) + d_p·onehot(t) + scatter(ids, d_xk)`, all times 1/T:
    a scatter of k + 1 values per row and one row-max pass, no extra GEMM.
    `logprobs_only`: a forward-only pass for the targets' logprobs (GSPO's and the sequence-level
    IS modes' first pass): per chunk the logits GEMM and `ops.row_logprobs` (log-sum-exp and the
    target logit; no entropy, no probabilities, no dZ), into one `[C, V]` buffer reused across
    chunks where the backend's `logits` takes `out` (no fresh pages per chunk). `coef_fn` and the
    gradient flags are ignored; returns `(logp, None, None, None)`.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    per_row_t = isinstance(temperature, torch.Tensor)
    inv_t_rows = (1.0 / temperature.float()) if per_row_t else None
    inv_t = 1.0 if per_row_t else 1.0 / temperature
    c = chunk_size or default_chunk_size(n, v, hidden.device, hidden.dtype)
    dev = hidden.device
    if logprobs_only:
        need_grad_hidden = need_grad_weight = False
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = None if logprobs_only else torch.empty_like(logp)
    grad_h = torch.empty_like(hidden) if need_grad_hidden else None
    acc_w = out_w = None
    if need_grad_weight:
        if grad_weight_dtype != torch.float32:
            out_w = torch.empty(v, d, dtype=grad_weight_dtype, device=dev)
        if out_w is None or n > c or not ops.direct_dw_out:
            acc_w = torch.empty(v, d, dtype=torch.float32, device=dev)
        if n == 0:  # no chunk runs: the gradient is zero
            (out_w if out_w is not None else acc_w).zero_()
    # logprobs_only: one logits buffer reused across chunks, kept only for fp32 inputs, the only ones
    # `ops.logits` writes into `out` (otherwise it would hold the first chunk's logits beside each
    # new chunk's). The full pass keeps none: row_stats hands its chunk on as `buf` to dlogits.
    reuse = logprobs_only and hidden.dtype == weight.dtype == torch.float32 and n > c
    z_buf = None
    for s in range(0, n, c):
        rows = slice(s, min(s + c, n))
        h_c = hidden[rows]
        z = ops.logits(h_c, weight, out=None if z_buf is None else z_buf[:rows.stop - s])
        if reuse and z_buf is None and rows.stop - s == c and z.is_contiguous():
            z_buf = z                                # reused by the next chunks (row_logprobs is in place)
        if per_row_t:
            z.mul_(inv_t_rows[rows].to(z.dtype).unsqueeze(1))
        if logprobs_only:                            # 2·N·D·V FLOPs and one row pass in all
            _, logp[rows] = ops.row_logprobs(z, targets[rows], inv_t)
            continue
        if gather_ids is not None:
            ids_c = gather_ids[rows]
            z_k = z.gather(1, ids_c).float()
            is_max = z_k >= z.amax(1, keepdim=True).float()
        lse, logp[rows], entropy[rows], buf = ops.row_stats(z, targets[rows], inv_t)
        if gather_ids is not None:
            out = coef_fn(rows, logp[rows], (z_k * inv_t - lse.unsqueeze(1), is_max))
        else:
            out = coef_fn(rows, logp[rows])
        if grad_h is None and not need_grad_weight:
            continue
        g, d_xk, d_p = (out, None, None) if isinstance(out, torch.Tensor) else out
        scale = inv_t_rows[rows] if per_row_t else inv_t      # 1/T of each row (or of all)
        if d_p is not None:
            g = g - d_p
        dz = ops.dlogits(buf, lse, targets[rows], g * scale if per_row_t else g, inv_t, hidden.dtype)
        if d_xk is not None:
            if d_p is not None:
                ar = torch.arange(dz.shape[0], device=dz.device)
                dz[ar, targets[rows]] += (d_p * scale).to(dz.dtype)
            dz.scatter_add_(1, ids_c, (d_xk * (scale.unsqueeze(1) if per_row_t else scale)).to(dz.dtype))
        if grad_h is not None:
            torch.mm(dz, weight, out=grad_h[rows])
        if need_grad_weight:
            ops.accumulate_dw(acc_w, dz, h_c, first=s == 0, out=out_w if rows.stop == n else None)
    return logp, entropy, grad_h, (out_w if out_w is not None else acc_w)

