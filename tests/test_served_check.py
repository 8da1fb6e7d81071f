"""The served-policy check against our real vLLM server: the trainer's copy of the served weights
passes (fp32 on CPU agrees far inside the tolerance), a trainer whose lm_head differs from what the
server serves stops with a clear message. Without vLLM: the comparison itself, and non-finite served
logprobs injected by a protocol double of `/generate` (a fault vLLM does not produce on demand)."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch

from atropos_core.model import ModelConfig, load_model_and_tokenizer
from atropos_core.served_check import (TRAINER, ServedPolicyMismatch, probe_difference, probe_ids, served_tolerance,
                                       start_served_check, trainer_logprobs, verify_served_policy)
from atropos_core.weight_sync.protocol import auth_headers


def _checkpoint_served(server):
    """(the checkpoint's model, its vocabulary size), with `server` brought back to serving the
    checkpoint (the session's server may serve weights another test pushed)."""
    r = requests.post(f"{server.url}/weights/load_from_disk", headers=auth_headers(server.token),
                      json={"path": str(server.model_dir), "version": server.next_version()}, timeout=300)
    assert r.status_code == 200, r.text
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(server.model_dir), attn_implementation="sdpa"),
                                        torch.device("cpu"))
    return model, model.get_input_embeddings().weight.shape[0]


@pytest.mark.vllm
def test_matching_weights_pass_and_a_stale_head_stops(vllm_server):
    model, vocab = _checkpoint_served(vllm_server)
    tol = served_tolerance(model)
    m = verify_served_policy(model, [vllm_server.url], vocab, step=1, tolerance=tol)
    assert 0 <= m["sync/verify_max_abs_diff"] < 1e-4
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)
    with pytest.raises(ServedPolicyMismatch, match="other weights"):
        verify_served_policy(model, [vllm_server.url], vocab, step=2, tolerance=tol)


@pytest.mark.vllm
def test_an_overlapped_check_judges_the_weights_it_started_with(vllm_server):
    """The driver starts the check right after a push and takes the verdict one train step later:
    the trainer's side is scored at the start, so the optimizer step in between (here: a changed
    lm_head) does not count against the servers; a check started after the change does fail."""
    from concurrent.futures import ThreadPoolExecutor

    model, vocab = _checkpoint_served(vllm_server)
    with ThreadPoolExecutor(1) as pool:
        pending = start_served_check(model, [vllm_server.url], vocab, step=7, executor=pool)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)  # the next step's update, before the verdict
        assert pending.result()["sync/verify_max_abs_diff"] < 1e-4
        with pytest.raises(ServedPolicyMismatch, match="step 8: .* other weights"):
            start_served_check(model, [vllm_server.url], vocab, step=8, executor=pool).result()


@pytest.mark.vllm
def test_tolerance_follows_the_coarser_dtype(vllm_server):
    model, _ = load_model_and_tokenizer(ModelConfig(path=str(vllm_server.model_dir), attn_implementation="sdpa"),
                                        torch.device("cpu"))
    assert served_tolerance(model) == 1e-3
    assert served_tolerance(model, "bfloat16") == 0.15


def test_probe_difference_takes_the_worst_server_and_fails_any_non_finite_logprob():
    mine = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    near, far = mine + torch.tensor([0.0, 1e-4, 0.0]), mine + torch.tensor([0.0, 0.0, -0.5])
    assert probe_difference(mine, {"a": near, "b": far, "c": near}) == (pytest.approx(0.5), "b")
    assert probe_difference(mine, {}) == (0.0, "")
    for bad in (math.nan, math.inf, -math.inf):
        hurt = near.clone()
        hurt[1] = bad
        # The non-finite server is the culprit wherever it stands, also behind a worse finite one.
        assert probe_difference(mine, {"a": far, "b": hurt}) == (math.inf, "b")
        assert probe_difference(hurt, {"a": near}) == (math.inf, TRAINER)


def _tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()


class _Generate(BaseHTTPRequestHandler):
    """`/generate` answering `prompt_logprobs` in our server's format; `self.server.lp` decides them."""

    def do_POST(self):
        ids = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]["prompt_token_ids"]
        entries = [None] + [{str(ids[t]): float(self.server.lp[t - 1])} for t in range(1, len(ids))]
        body = json.dumps({"prompt_logprobs": entries}).encode()  # NaN/inf as JSON's NaN/Infinity
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def generate_double():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Generate)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_a_server_returning_non_finite_logprobs_stops_the_run_by_name(generate_double, bad):
    srv, url = generate_double
    model = _tiny_lm()
    vocab = model.get_input_embeddings().weight.shape[0]
    srv.lp = trainer_logprobs(model, probe_ids(vocab)).tolist()
    assert verify_served_policy(model, [url], vocab, step=1)["sync/verify_max_abs_diff"] == 0.0
    srv.lp[5] = bad
    with pytest.raises(ServedPolicyMismatch, match=f"step 2: the inference server {url} returned non-finite"):
        verify_served_policy(model, [url], vocab, step=2)
