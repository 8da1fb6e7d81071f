"""Our vLLM server speaks Atropos's token-in/token-out protocol.

The strongest check goes through atroposlib's own, unmodified `ServerManager` with
`server_type="vllm"` (what every Atropos environment uses): sampled tokens come back with logprobs
that equal transformers' teacher-forced logprobs of those same tokens (1e-4), on weights we pushed
ourselves (the session server is shared, so the test first pushes the checkpoint's weights).
"""
from __future__ import annotations

import asyncio
import sys

import pytest
import requests
import torch

from atropos_core.inference.vllm_command import AUTO_PLAIN_MAX_BYTES, resolve_cpu_weight_layout, vllm_server_command
from atropos_core.weight_sync import WeightSync, WeightSyncConfig
from tests.fixtures.vllm_server import hf_token_logprobs, vllm_generate

pytestmark = pytest.mark.vllm

LOGPROB_TOL = 1e-4


def _served_checkpoint(server):
    """Push the checkpoint's own weights, so the served model is known; return it (transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(server.model_dir), dtype=torch.float32).eval()
    sync = WeightSync(WeightSyncConfig(), [server.url], server.token)
    sync.connect()
    try:
        sync.push(model, server.next_version())
    finally:
        sync.close()
    return model


def test_command_binds_loopback_and_keeps_token_off_argv(tmp_path):
    cmd = vllm_server_command(tmp_path, port=1234)
    assert cmd[:3] == [sys.executable, "-m", "atropos_core.inference.server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    for flag, value in (("--dtype", "float32"), ("--max-model-len", "512"), ("--seed", "0")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and "--worker-extension-cls" in cmd and "--weight-transfer-config" in cmd
    assert not any("token" in c.lower() for c in cmd)
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    mine = vllm_server_command(tmp_path, port=1234, extra_args=["--logprobs-mode", "raw_logits"])
    assert mine.count("--logprobs-mode") == 1 and mine[-1] == "raw_logits"


def test_auto_cpu_weight_layout_follows_the_checkpoint_size(tmp_path):
    small, big, empty = tmp_path / "small", tmp_path / "big", tmp_path / "empty"
    for d in (small, big, empty):
        d.mkdir()
    (small / "model.safetensors").write_bytes(b"\0" * 1000)
    for i in range(2):  # sharded: the shards' sizes add up
        with open(big / f"model-0000{i}.safetensors", "wb") as f:
            f.truncate(AUTO_PLAIN_MAX_BYTES // 2 + 1)
    assert resolve_cpu_weight_layout("auto", small)[0] == "plain"
    assert resolve_cpu_weight_layout("auto", big) == ("packed", "auto: 32.0 MiB of weights, over 32 MiB")
    assert resolve_cpu_weight_layout("auto", empty)[0] == "packed"
    assert resolve_cpu_weight_layout("auto", tmp_path / "missing")[0] == "packed"
    assert resolve_cpu_weight_layout("plain", big) == ("plain", "asked for")
    with pytest.raises(ValueError, match="cpu_weight_layout must be one of"):
        resolve_cpu_weight_layout("fast", small)


def test_logprobs_at_temperature_match_the_trainer(vllm_server):
    """Sampled at temperature 0.7, the served logprobs are the trainer's log_softmax(z / 0.7) of those
    tokens (the trainer's own loss path, `loss.temperature=0.7`), not the raw softmax(z) logprobs
    vLLM returns by default (the control: those differ by far more than the tolerance)."""
    from atropos_core.loss import LossSpec, advantage_weighted_sft_loss

    model = _served_checkpoint(vllm_server)
    prompt = [5, 6, 7, 8]
    out = vllm_generate(vllm_server.url, prompt, n=4, max_tokens=6, temperature=0.7, seed=3)
    for comp in out["logprobs"]:
        toks = [int(next(iter(entry[0]))) for entry in comp]   # entry: [{sampled id: logprob, ...}]
        served = torch.tensor([float(next(iter(entry[0].values()))) for entry in comp], dtype=torch.float64)
        ids = torch.tensor([prompt + toks])
        mask = torch.zeros_like(ids, dtype=torch.float32)
        mask[0, len(prompt):] = 1
        with torch.no_grad():
            _, st = advantage_weighted_sft_loss(model, ids, torch.zeros(1), mask,
                                                  LossSpec(loss_type="awsft", temperature=0.7, backend="torch"))
        trainer = st["logprobs"][0, len(prompt) - 1:].double()
        raw = torch.tensor(hf_token_logprobs(model, prompt, toks), dtype=torch.float64)
        err = (served - trainer).abs().max().item()
        assert err < LOGPROB_TOL, f"served logprobs at T=0.7 differ from the trainer's by {err:.2e}"
        assert (served - raw).abs().max().item() > 100 * LOGPROB_TOL, "control: raw logprobs should differ"


def test_atroposlib_server_manager_samples_from_our_server(vllm_server):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.server_manager import ServerManager

    model = _served_checkpoint(vllm_server)
    prompt = [5, 6, 7, 8]
    n, max_tokens = 4, 6

    async def sample():
        cfg = APIServerConfig(server_type="vllm", base_url=f"{vllm_server.url}/v1", api_key="env-key",
                              model_name=str(vllm_server.model_dir), tokenizer_name=str(vllm_server.model_dir),
                              timeout=120, num_max_requests_at_once=4, num_requests_for_eval=4)
        manager = ServerManager([cfg])
        try:
            return await manager.tokens_and_logprobs_completion(
                input_ids=prompt, n=n, max_tokens=max_tokens, temperature=1.0)
        finally:
            for server in manager.servers:
                if getattr(server, "check_task", None) is not None:
                    server.check_task.cancel()

    prompt_tokens, output_tokens, output_logprobs, finish_reasons = asyncio.run(sample())
    assert prompt_tokens == prompt
    assert len(output_tokens) == len(output_logprobs) == len(finish_reasons) == n
    vocab = model.config.vocab_size
    for toks, lps, reason in zip(output_tokens, output_logprobs, finish_reasons):
        assert reason in ("length", "stop")
        assert 1 <= len(toks) <= max_tokens and len(lps) == len(toks)
        assert all(0 <= t < vocab for t in toks)
        ref = hf_token_logprobs(model, prompt, toks)
        err = max(abs(a - b) for a, b in zip(lps, ref))
        assert err < LOGPROB_TOL, f"sampled-token logprobs differ from transformers by {err:.2e}"


def test_generate_prompt_logprobs_and_version(vllm_server):
    out = vllm_generate(vllm_server.url, [5, 6, 7], n=1, max_tokens=2, temperature=0.0, prompt_logprobs=1)
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == 3
    assert all(isinstance(d, dict) and d for d in out["prompt_logprobs"][1:])
    state = requests.get(f"{vllm_server.url}/weight_version", timeout=10).json()
    assert out["weight_version"] == state["weight_version"]


@pytest.mark.parametrize("body", [
    {"prompt": {"prompt_token_ids": []}},
    {"prompt": {"prompt_token_ids": ["a", "b"]}},
    {"prompt": 17},
    {"prompt": {"prompt_token_ids": [1, 2]}, "n": 0},
    {"prompt": {"prompt_token_ids": [1] * 600}, "max_tokens": 4},
])
def test_generate_rejects_bad_input_clearly(vllm_server, body):
    r = requests.post(f"{vllm_server.url}/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_generate_needs_no_update_token_and_openai_routes_stay(vllm_server):
    r = requests.post(f"{vllm_server.url}/generate", timeout=60,
                      json={"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 1, "temperature": 0.0})
    assert r.status_code == 200
    models = requests.get(f"{vllm_server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == str(vllm_server.model_dir)


def test_seeded_samples_survive_a_chunked_prefill_and_repeat_exactly(vllm_server):
    """A request with a `seed` whose prompt is prefilled in chunks: on CPU, vLLM 0.32 rewound the
    discarded chunk's sample with the CUDA-only generator offset and the engine died
    (`worker_ext._install_cpu_generator_rewind`). n=40 samples of a 480-token prompt need 19,200
    prefill tokens, more than one step's token budget, so one sample's prompt is split across steps.
    Sample i has seed 11 + i (vLLM's rule for n > 1); each must equal the same seed asked alone,
    whose prompt fits one step: the discarded sample consumed nothing from its generator."""
    prompt = [(7 * i + 3) % 250 + 20 for i in range(480)]
    n, seed, max_tokens = 40, 11, 12
    together = vllm_generate(vllm_server.url, prompt, n=n, seed=seed, max_tokens=max_tokens, temperature=1.0)
    assert len(together["token_ids"]) == n
    alone = [vllm_generate(vllm_server.url, prompt, n=1, seed=seed + i, max_tokens=max_tokens,
                           temperature=1.0)["token_ids"][0] for i in range(n)]
    differ = [i for i in range(n) if together["token_ids"][i] != alone[i]]
    assert not differ, f"samples {differ} differ from the same seed asked alone"
    assert len(set(map(tuple, alone))) > 1, "every seed gave the same tokens: the seeds were not applied"
