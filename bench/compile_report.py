"""Offline compile report of every shipped Triton kernel config: registers, spills, shared memory.

Why: this machine has no GPU, but Triton compiles for real GPUs ahead of time (ptxas ships in the
wheel), and the two failure modes a config can hide until it meets a GPU are visible in the
cubin: register spills (local-memory traffic that can halve a kernel's speed) and a shared-memory
footprint over the architecture's per-block limit (the launch fails outright). A config that
spills on the target is changed in `kernels.triton_linear_loss.launch_config`, not tolerated.

What is compiled: each kernel of `kernels/triton_linear_loss.py` with each distinct config that
`launch_config` returns for realistic shapes (V in 32768, 128256, 151936; D in 1024, 4096), in
bf16 (the training dtype) and fp32 (whose dW GEMM uses a different config), for sm_90 and sm_80.
Arguments are specialised as a real launch would specialise them (integers equal to 1 become
constants, integers and 16-byte-aligned pointers divisible by 16 carry that hint), since both
change the code ptxas sees. Registers and local memory come from `cuobjdump --dump-resource-usage`
on the cubin: LOCAL is the per-thread local memory, which is where spills go, so any LOCAL (or
STACK) byte counts as a spill here.

Usage:
    python bench/compile_report.py [--json FILE] [--arch sm_90 sm_80]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a warning printed per compile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_linear_loss as tll  # noqa: E402
from kernels.chunked import default_chunk_size  # noqa: E402

VOCABS = (32768, 128256, 151936)
DIMS = (1024, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Largest dynamic shared memory one block may opt into (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): 227 KiB on 9.0, 163 KiB on 8.0.
SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
ARCH_CC = {"sm_90": 90, "sm_80": 80}
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _spec(value):
    """(signature type, divisibility attr?) the way the JIT specialises a runtime integer."""
    if value == 1:
        return "constexpr", False
    return ("i64" if value >= 2**31 else "i32"), value % 16 == 0


def _kernel_args(kernel: str, vocab: int, dim: int, dtype: torch.dtype):
    """(jit function, [(name, value)] of its runtime arguments) for one realistic chunk launch.

    Pointers appear as their Triton type ("*bf16"), assumed 16-byte aligned (torch allocations
    are); integers take the values a chunk of the default CUDA chunk size would pass (N=8192).
    The logits chunk is fp32 whatever the inputs' dtype (`TorchOps.logits`); dZ has the inputs'
    dtype; accumulate_dw is compiled as the chunks before the last run it (LOAD_DW, fp32 out).
    """
    c = default_chunk_size(8192, vocab, torch.device("cuda"), dtype)
    p = "*" + _TRITON_DTYPE[dtype]
    if kernel == "row_stats":
        return tll._row_stats_kernel, [("z_ptr", "*fp32"), ("stride_z_row", vocab), ("tgt_ptr", "*i64"),
                                       ("lse_ptr", "*fp32"), ("logp_ptr", "*fp32"), ("ent_ptr", "*fp32"),
                                       ("V", vocab), ("inv_t", 1.25)]
    if kernel == "dlogits":
        return tll._dlogits_kernel, [("z_ptr", "*fp32"), ("stride_z_row", vocab), ("dz_ptr", p),
                                     ("stride_dz_row", vocab), ("lse_ptr", "*fp32"), ("tgt_ptr", "*i64"),
                                     ("coef_ptr", "*fp32"), ("V", vocab), ("inv_t", 1.25)]
    if kernel == "accumulate_dw":
        return tll._accumulate_dw_kernel, [("dw_ptr", "*fp32"), ("stride_dw_v", dim), ("stride_dw_d", 1),
                                           ("out_ptr", "*fp32"), ("stride_out_v", dim), ("stride_out_d", 1),
                                           ("dz_ptr", p), ("stride_dz_c", vocab), ("stride_dz_v", 1),
                                           ("h_ptr", p), ("stride_h_c", dim), ("stride_h_d", 1),
                                           ("C", c), ("V", vocab), ("D", dim)]
    raise ValueError(f"unknown kernel {kernel!r}")


def shipped_configs(vocabs=VOCABS, dims=DIMS, dtypes=tuple(DTYPES)):
    """Distinct (kernel, dtype name, config, vocab, dim) that `launch_config` returns for these shapes.

    The first shape that yields a config is kept as its example: the config alone decides the
    code (shapes only enter as runtime integers, all divisible by 16 here).
    """
    seen = {}
    for dname in dtypes:
        for kernel in ("row_stats", "dlogits", "accumulate_dw"):
            for v in vocabs:
                for d in dims:
                    cfg = tll.launch_config(kernel, vocab=v, dim=d, dtype=DTYPES[dname])
                    key = (kernel, dname, json.dumps(cfg, sort_keys=True))
                    seen.setdefault(key, (kernel, dname, cfg, v, d))
    return list(seen.values())


def _resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k: int(v) for k, v in fields.items()}


def compile_one(kernel: str, dname: str, config: dict, vocab: int, dim: int, arch: str) -> dict:
    """Compile one kernel config for `arch` ("sm_90" | "sm_80") and return its report row."""
    fn, args = _kernel_args(kernel, vocab, dim, DTYPES[dname])
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    if kernel == "accumulate_dw":
        meta["LOAD_DW"] = True
    if kernel == "row_stats":
        meta["ENTROPY"] = True                          # the superset; ENTROPY=False only drops the sums
    names = fn.arg_names
    signature, constexprs, attrs = {}, dict(meta), {}
    for name, value in args:
        if isinstance(value, str):                      # a pointer
            signature[name] = value
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            ty, div16 = _spec(value)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = value
            elif div16:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name in meta:
        signature[name] = "constexpr"
    signature = {n: signature[n] for n in names}       # the JIT's argument order
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", ARCH_CC[arch], 32),
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    usage = _resource_usage(compiled.asm["cubin"])
    return {
        "kernel": kernel,
        "config": config,
        "arch": arch,
        "dtype": dname,
        "registers": usage["REG"],
        "spills": usage.get("LOCAL", 0) + usage.get("STACK", 0),
        "shared": int(compiled.metadata.shared),
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def problems(row: dict) -> list:
    """What is wrong with a report row (empty when the config is fit to ship)."""
    out = []
    if row["spills"]:
        out.append(f"{row['spills']} bytes of local memory (spills)")
    if row["shared"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B over the {row['arch']} limit {SMEM_LIMIT[row['arch']]} B")
    if row["registers"] * row["config"]["num_warps"] * 32 > 65536:
        out.append(f"{row['registers']} registers x {row['config']['num_warps']} warps exceed the 64K register file")
    return out


def report(archs=("sm_90", "sm_80"), dtypes=tuple(DTYPES)) -> list:
    rows = []
    for kernel, dname, cfg, v, d in shipped_configs(dtypes=dtypes):
        for arch in archs:
            rows.append(compile_one(kernel, dname, cfg, v, d, arch))
    return rows


def _format(rows) -> str:
    head = f"{'kernel':<14} {'dtype':<5} {'arch':<6} {'regs':>5} {'spill B':>7} {'smem B':>7} {'s':>5}  config / problems"
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        bad = "; ".join(problems(r))
        lines.append(f"{r['kernel']:<14} {r['dtype']:<5} {r['arch']:<6} {r['registers']:>5} {r['spills']:>7} "
                     f"{r['shared']:>7} {r['compile_s']:>5}  {cfg}" + (f"  !! {bad}" if bad else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows as a JSON list to this file")
    ap.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    rows = report(tuple(args.arch), tuple(args.dtype))
    print(_format(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if problems(r)]
    if bad:
        print(f"{len(bad)} config(s) unfit to ship", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
