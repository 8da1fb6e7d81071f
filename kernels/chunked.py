"""Chunked linear → log-softmax → token loss, with the gradient computed in the forward pass.

Maths. For the selected tokens (mask != 0; masked tokens are dropped *before* any GEMM: Atropos
prompts are masked, often half the tokens), in chunks of C tokens:

    z   = h_c @ W.T                    (C, V)   2·C·D·V FLOPs  (GEMM)
    lse = logsumexp(z / T),  logp = z[t]/T - lse,  H = lse - Σ softmax(z/T)·z/T
    g   = dL/dlogp                     (C,)     from kernels.losses (token-local)
    dZ  = g/T · (onehot(t) - softmax(z/T))      written over the logits buffer
    dH_c = dZ @ W                      (C, D)   2·C·D·V FLOPs  (GEMM)
    dW  += dZ.T @ h_c                  (V, D)   2·C·D·V FLOPs  (GEMM, fp32 accumulator)

so forward+backward is 6·N·D·V FLOPs and the autograd backward only scales the saved gradients by
the incoming scalar. Never materialised: the `[N, V]` logits. Peak extra memory on the torch path:
one `[C, V]` fp32 buffer, a `ENTROPY_BLOCK_BYTES` scratch and the fp32 `[V, D]` weight gradient,
independent of N.

Measured (CPU, 2 shared cores, N=4096, D=1024, V=32768, fp32, fwd+bwd; docs/kernels.md has the
tables): extra peak 215 MiB against naive's 1956 MiB (11%); CPU time 1.03-1.09x the three plain
GEMMs with one thread at chunk 256-2048 (1.2x before `TorchOps` went in place); chunk 128 costs
1.21x (the per-chunk `dW += dZ.T @ h_c` rereads all of dW). `torch.logsumexp` was the single
largest non-GEMM cost (~5x an in-place `log_softmax`).

`linear_logprobs` returns a per-token vector, whose incoming gradient is only known in backward:
it saves `lse` (N floats) and recomputes each chunk's logits there (8·N·D·V in all).

The loop is shared by both backends; a backend supplies the four row-wise operations of
`TorchOps` (the Triton backend, `kernels/triton_linear_loss.py`, fuses each into one kernel).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# Bytes of fp32 logits one chunk may hold (one such buffer per chunk on the torch path).
# 64 MiB (512 rows at V=32768) keeps N=4096 at 11% of naive's extra peak and sits on the flat part
# of the measured chunk sweep (256-2048 rows within noise of each other; 128 rows 12% slower).
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 1 << 30
# Scratch for TorchOps' entropy pass: a few hundred rows of V at most, reused across row blocks.
ENTROPY_BLOCK_BYTES = 16 << 20


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    c = max(16, budget // (4 * max(vocab, 1)))
    c = 1 << int(math.log2(c))  # power of two: GEMM-friendly tiles
    return max(1, min(c, max(n_tokens, 1)))


class TorchOps:
    """Row-wise operations over one chunk of logits, in plain torch (any device).

    One `[C, V]` fp32 buffer per chunk: the logits are turned into log-probabilities in place
    (`log_softmax(out=z)`, one fused pass), then into probabilities in place, and `dlogits` scales
    that same buffer into dZ. The entropy dot `-Σ p·log p` needs both views at once, so it runs
    over row blocks through one small `ENTROPY_BLOCK_BYTES` scratch (exp into scratch, row dot,
    copy back) instead of a second `[C, V]` buffer. See the module docstring for measurements.
    """

    name = "torch"

    @staticmethod
    def logits(h_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.mm(h_c, weight.t())

    @staticmethod
    def row_stats(z: torch.Tensor, targets: torch.Tensor, inv_t: float):
        """`(lse, logp, entropy, buf)`: the first three (C,) fp32 for softmax(z·inv_t); `buf` is
        whatever this backend hands on to `dlogits` (here: the probabilities). May overwrite z."""
        z = z.float() if z.dtype != torch.float32 else z.contiguous()
        if inv_t != 1.0:
            z.mul_(inv_t)
        c, v = z.shape
        rows = torch.arange(c, device=z.device)
        z_t = z[rows, targets]
        # In place: log_softmax works row by row (max, sum of exp, then write), so out=z is safe;
        # it replaces logsumexp + subtract + a [C, V] temporary (logsumexp alone cost ~5x this).
        torch.log_softmax(z, 1, out=z)
        logp = z[rows, targets]
        lse = z_t - logp  # rounding ~eps·|logp|: the error logp itself carries
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
    def accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h_c: torch.Tensor) -> None:
        """dw (fp32, (V, D)) += dz.T @ h_c."""
        if dz.dtype == torch.float32:
            dw.addmm_(dz.t(), h_c.float())
        else:
            dw.add_(torch.mm(dz.t(), h_c).float())


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
    gather_ids: Optional[torch.Tensor] = None,
):
    """Run the chunk loop over all rows of `hidden` (already restricted to selected tokens).

    `coef_fn(rows, logp_chunk)` returns the (C,) fp32 coefficient `dL/dlogp` for those rows (it
    may also record loss terms). Returns `(logp, entropy, grad_hidden, grad_weight)`; gradients are
    None when not requested, grad_weight is fp32.

    `temperature`: a float, or an `(n,)` tensor of per-row temperatures (the chunk's logits are
    then scaled row by row before the row-wise ops, which run at temperature 1).
    `gather_ids`: `(n, k)` vocabulary ids (distillation). Then `coef_fn(rows, logp_chunk, extra)`
    gets `extra = (logp_k (C, k) log-softmax at those ids, is_argmax (C, k) bool: the id holds the
    row's largest logit)` and returns `g` or `(g, d_xk, d_p)`: the loss's derivative with respect
    to the k tempered logits besides `d_p (C,) · softmax(x)` over the row. They go into dZ as
    `dZ = (g - d_p)(onehot(t) - p) + d_p·onehot(t) + scatter(ids, d_xk)`, all scaled by 1/T: a
    scatter of k + 1 values per row, no extra GEMM.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    per_row_t = isinstance(temperature, torch.Tensor)
    inv_t_rows = (1.0 / temperature.float()) if per_row_t else None
    inv_t = 1.0 if per_row_t else 1.0 / temperature
    c = chunk_size or default_chunk_size(n, v, hidden.device)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp)
    grad_h = torch.empty_like(hidden) if need_grad_hidden else None
    grad_w = torch.zeros(v, d, dtype=torch.float32, device=hidden.device) if need_grad_weight else None
    for s in range(0, n, c):
        rows = slice(s, min(s + c, n))
        h_c = hidden[rows]
        z = ops.logits(h_c, weight)
        if per_row_t:
            z = z.float() if z.dtype != torch.float32 else z
            z.mul_(inv_t_rows[rows].unsqueeze(1))
        if gather_ids is not None:
            ids_c = gather_ids[rows]
            z_k = z.gather(1, ids_c).float()
            is_max = z_k >= z.amax(1, keepdim=True).float()
        lse, logp[rows], entropy[rows], buf = ops.row_stats(z, targets[rows], inv_t)
        if gather_ids is not None:
            out = coef_fn(rows, logp[rows], (z_k * inv_t - lse.unsqueeze(1), is_max))
        else:
            out = coef_fn(rows, logp[rows])
        if grad_h is None and grad_w is None:
            continue
        g, d_xk, d_p = (out, None, None) if isinstance(out, torch.Tensor) else out
        if d_p is not None:
            g = g - d_p
        scale = inv_t_rows[rows] if per_row_t else None
        dz = ops.dlogits(buf, lse, targets[rows], g * scale if per_row_t else g, inv_t, hidden.dtype)
        if d_xk is not None:
            k_scale = scale.unsqueeze(1) if per_row_t else inv_t
            ar = torch.arange(dz.shape[0], device=dz.device)
            if d_p is not None:
                dz[ar, targets[rows]] += (d_p * (scale if per_row_t else inv_t)).to(dz.dtype)
            dz.scatter_add_(1, ids_c, (d_xk * k_scale).to(dz.dtype))
        if grad_h is not None:
            grad_h[rows] = torch.mm(dz, weight)
        if grad_w is not None:
            ops.accumulate_dw(grad_w, dz, h_c)
    return logp, entropy, grad_h, grad_w
