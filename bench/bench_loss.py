"""Speed and peak memory of the fused linear policy loss against its peers, forward + backward.

Why each provider runs in a fresh subprocess: peak memory on CPU is read from the process's
`ru_maxrss` (torch's CPU allocations are invisible to `tracemalloc`), a high-water mark that never
comes down, so one process can only measure one provider. The peak is reported against a baseline
taken after the inputs (hidden, weight, targets, advantages, mask) are allocated, so it is the
*extra* memory of one forward+backward: gradients, logits, temporaries. On CUDA the same number
comes from `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.

Providers (all compute forward + backward of a loss on `hidden @ weight.T` with all tokens trained):
    ours               kernels.fused_linear_policy_loss, backend "torch" (grpo, per-token advantages)
    naive              kernels.reference.policy_loss_ref(upcast=False): full [N, V] logits
    torch_lce_chunked  torch's F.linear_cross_entropy with LinearCrossEntropyOptions(): plain CE,
                       the same GEMM work, the chunked peer shipped with torch
    liger_chunked      liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=False), bnpo
    gemm_floor         the three plain GEMMs (logits, dX, dW) of the same shape, nothing else
    ours_gspo          ours with loss_type "gspo" (sequences of 256 tokens): two passes, 8·N·D·V
    ours_distill       ours (grpo) plus the top-k distillation term (k = 20, "kl")
    ours_token_tis     ours (grpo) with token-level truncated IS against behaviour logprobs
    triton             (CUDA) ours with backend "triton"
    liger_triton       (CUDA) Liger's Triton LigerFusedLinearCrossEntropyLoss (plain CE)

Usage:
    python bench/bench_loss.py --device cpu --shape 4096,1024,32768 --dtype float32 --reps 3
Rows are appended to bench/results/loss.csv (long format: one row per provider and shape, with
device, commit and date); `bench/plot.py` draws the figures from that file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import append_rows, memory_baseline, peak_extra_mb, run_json_worker, run_meta  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "loss.csv"
CSV_FIELDS = ["device", "commit", "date", "provider", "N", "D", "V", "dtype", "ms_median", "peak_mem_mb"]
CPU_PROVIDERS = ["ours", "naive", "torch_lce_chunked", "liger_chunked", "gemm_floor"]
CUDA_PROVIDERS = CPU_PROVIDERS + ["triton", "liger_triton"]


def _make_inputs(n, d, v, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    advantages = torch.randn(n, generator=g).to(device)
    mask = torch.ones(n, device=device)
    return hidden, weight, targets, advantages, mask


def _step_fn(provider, hidden, weight, targets, advantages, mask):
    """A closure doing one forward+backward for `provider` (weights' .grad reset each call)."""
    import torch
    import torch.nn.functional as F

    def run_loss(loss_fn):
        def step():
            hidden.grad = None
            weight.grad = None
            loss = loss_fn()
            loss.backward()
        return step

    if provider in ("ours", "triton"):
        import kernels

        backend = "torch" if provider == "ours" else "triton"
        spec = kernels.LossSpec(loss_type="grpo", backend=backend)
        return run_loss(lambda: kernels.fused_linear_policy_loss(hidden, weight, targets, advantages, mask, spec)[0])
    if provider in ("ours_gspo", "ours_distill", "ours_token_tis"):
        import kernels

        # Off-policy / GSPO / distillation variants of "ours" (docs/kernels.md): sequences of 256
        # tokens, behaviour and old logprobs near the policy's, a teacher's top-20.
        n = hidden.shape[0]
        g = torch.Generator().manual_seed(1)
        dev = hidden.device
        near = (-5.0 + 0.3 * torch.randn(n, generator=g)).to(dev)
        spec = kernels.LossSpec(loss_type="grpo", backend="torch")
        if provider == "ours_gspo":
            spec = kernels.LossSpec(loss_type="gspo", backend="torch")
            kw = dict(old_logprobs=near, sequence_ids=(torch.arange(n) // 256).to(dev))
        elif provider == "ours_token_tis":
            spec = kernels.LossSpec(loss_type="grpo", is_mode="token_tis", backend="torch")
            kw = dict(behaviour_logprobs=near, sequence_ids=(torch.arange(n) // 256).to(dev))
        else:
            k = 20
            spec = kernels.LossSpec(loss_type="grpo", distill_coef=1.0, distill_mode="kl", backend="torch")
            kw = dict(distill_ids=torch.randint(0, weight.shape[0], (n, k), generator=g).to(dev),
                      distill_logprobs=torch.log_softmax(torch.randn(n, k, generator=g), 1).to(dev))
        return run_loss(lambda: kernels.fused_linear_policy_loss(hidden, weight, targets, advantages, mask, spec,
                                                                 **kw)[0])
    if provider == "naive":
        from kernels import LossSpec
        from kernels.reference import policy_loss_ref

        return run_loss(lambda: policy_loss_ref(hidden, weight, targets, advantages, mask, LossSpec(loss_type="grpo"),
                                                upcast=False)[0])
    if provider == "torch_lce_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return run_loss(lambda: F.linear_cross_entropy(hidden, weight, targets, options=opts))
    if provider == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # One "sequence" of all N tokens: Liger takes per-sequence advantages only.
        mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="bnpo")
        adv_seq = advantages[:1].contiguous()
        return run_loss(lambda: mod(hidden.unsqueeze(0), weight, targets.unsqueeze(0), mask.unsqueeze(0),
                                    adv_seq)[0])
    if provider == "liger_triton":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        return run_loss(lambda: mod(weight, hidden, targets))
    if provider == "gemm_floor":
        def step():
            with torch.no_grad():
                z = torch.mm(hidden, weight.t())
                dx = torch.mm(z, weight)
                dw = torch.mm(z.t(), hidden)
            del z, dx, dw
        return step
    raise ValueError(f"unknown provider {provider!r}")


def _worker(args) -> dict:
    """Runs in the child process: time one provider, report {ms_median, peak_mem_mb} as JSON."""
    import torch

    n, d, v = args.shape
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = _make_inputs(n, d, v, dtype, device)
    step = _step_fn(args.worker, *inputs)
    cuda = device.type == "cuda"
    # On CPU: ru_maxrss, the high-water mark so far (imports + inputs), is the baseline of "extra".
    base = memory_baseline(device)
    times, cpu_times = [], []
    for i in range(args.warmup + args.reps):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = peak_extra_mb(device, base)
    # CPU seconds (all threads) beside wall time: on a shared machine the wall clock swings 2-5x
    # with other load while CPU time moves ~10%, so it is the steadier number for comparisons.
    return {"ms_median": statistics.median(times) * 1e3, "peak_mem_mb": peak,
            "ms_all": [t * 1e3 for t in times], "cpu_ms_median": statistics.median(cpu_times) * 1e3}


def _run_provider(provider, args) -> dict:
    return run_json_worker(Path(__file__).resolve(), [
        "--worker", provider, "--device", args.device, "--shape", ",".join(map(str, args.shape)),
        "--dtype", args.dtype, "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="4096,1024,32768", help="N,D,V")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--providers", default="", help="comma-separated subset (default: all for the device)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--csv", default=str(RESULTS), help="CSV to append to ('' to skip)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = tuple(int(x) for x in args.shape.split(","))
    if len(args.shape) != 3:
        p.error("--shape must be N,D,V")
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    providers = [x for x in args.providers.split(",") if x] or (
        CUDA_PROVIDERS if args.device == "cuda" else CPU_PROVIDERS)
    n, d, v = args.shape
    rows = []
    print(f"{'provider':<18} {'ms_median':>10} {'peak_mem_mb':>12} {'cpu_ms':>9}  (N={n} D={d} V={v} {args.dtype} "
          f"{args.device}, {args.reps} reps + {args.warmup} warm-up, each in a fresh process)")
    for prov in providers:
        res = _run_provider(prov, args)
        if "error" in res:
            print(f"{prov:<18} failed: {res['error']}")
            continue
        row = {"provider": prov, "N": n, "D": d, "V": v, "dtype": args.dtype,
               "ms_median": round(res["ms_median"], 2), "peak_mem_mb": round(res["peak_mem_mb"], 1)}
        rows.append(row)
        print(f"{prov:<18} {row['ms_median']:>10.1f} {row['peak_mem_mb']:>12.1f} {res['cpu_ms_median']:>9.0f}   all ms: "
              + ", ".join(f"{t:.0f}" for t in res["ms_all"]))
    if args.csv and rows:
        meta = run_meta(args.device)
        append_rows(Path(args.csv), CSV_FIELDS, [{**meta, **r} for r in rows])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
