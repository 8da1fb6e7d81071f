"""The served-policy check against our real vLLM server: the trainer's copy of the served weights
passes (fp32 on CPU agrees far inside the tolerance), a trainer whose lm_head differs from what the
server serves stops with a clear message."""
from __future__ import annotations

import pytest
import requests
import torch

from atropos_core.model import ModelConfig, load_model_and_tokenizer
from atropos_core.served_check import ServedPolicyMismatch, served_tolerance, verify_served_policy
from atropos_core.weight_sync.protocol import auth_headers

pytestmark = pytest.mark.vllm


def test_matching_weights_pass_and_a_stale_head_stops(vllm_server):
    # The session's server may serve weights another test pushed: bring it back to the checkpoint.
    r = requests.post(f"{vllm_server.url}/weights/load_from_disk", headers=auth_headers(vllm_server.token),
                      json={"path": str(vllm_server.model_dir), "version": vllm_server.next_version()}, timeout=300)
    assert r.status_code == 200, r.text
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(vllm_server.model_dir), attn_implementation="sdpa"),
                                        torch.device("cpu"))
    vocab = model.get_input_embeddings().weight.shape[0]
    tol = served_tolerance(model)
    m = verify_served_policy(model, [vllm_server.url], vocab, step=1, tolerance=tol)
    assert 0 <= m["sync/verify_max_abs_diff"] < 1e-4
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)
    with pytest.raises(ServedPolicyMismatch, match="other weights"):
        verify_served_policy(model, [vllm_server.url], vocab, step=2, tolerance=tol)


def test_tolerance_follows_the_coarser_dtype(vllm_server):
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(vllm_server.model_dir), attn_implementation="sdpa"),
                                        torch.device("cpu"))
    assert served_tolerance(model) == 1e-3
    assert served_tolerance(model, "bfloat16") == 0.15
