"""Session-wide test setup: markers, the GPU skip, and the shared fixtures.

Heavy fixtures (the Atropos API process, the vLLM server, the tiny models) live in
`tests/fixtures/` and are registered below so that one of each serves the whole session.
"""
from __future__ import annotations

import os

import pytest

# Keep compile warnings and hub lookups out of every subprocess the tests start.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.atropos_api",
    "tests.fixtures.vllm_server",
]


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if "gpu" in it.keywords]
    if not gpu_items:
        return
    import torch  # imported here, not at module import, so collection never touches CUDA

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for it in gpu_items:
            it.add_marker(skip)
