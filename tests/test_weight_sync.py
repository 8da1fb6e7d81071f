"""Weight sync: after a real optimizer step, vLLM serves exactly the trainer's weights.

The reference is transformers on the trainer's own (updated) weights: vLLM's greedy continuation
must equal it token for token and its logprobs must match within 1e-4 (fp32 on both sides; before
any update the two agree to ~1e-6). Fault tests check that a failed update raises one clear
`WeightSyncError` and leaves the server serving (not paused), and that the next push recovers.
"""
from __future__ import annotations

import pytest
import requests
import torch

from atropos_core.weight_sync.protocol import (
    WeightSyncError,
    clean_param_name,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
    validate_manifest,
)
from atropos_core.weight_sync.push import WeightSync, WeightSyncConfig
from atropos_core.weight_sync.transport import pick_backend
from tests.fixtures.vllm_server import hf_greedy, hf_token_logprobs, vllm_generate

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50], [100], [3, 1, 4, 1, 5, 9, 2, 6]]
NEW_TOKENS = 8
LOGPROB_TOL = 1e-4


def load_hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def train_step(model, seed: int, lr: float = 3e-2) -> None:
    """One real AdamW step on a batch of random token sequences (next-token cross-entropy)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def assert_serves(url: str, model) -> None:
    """vLLM's greedy tokens and their logprobs equal transformers' on `model`."""
    for prompt in PROMPTS:
        out = vllm_generate(url, prompt, n=1, max_tokens=NEW_TOKENS, temperature=0.0)
        got_ids = out["token_ids"][0]
        assert got_ids == hf_greedy(model, prompt, NEW_TOKENS), f"greedy tokens differ for prompt {prompt}"
        got_lp = [list(tok[0].values())[0] for tok in out["logprobs"][0]]
        ref_lp = hf_token_logprobs(model, prompt, got_ids)
        err = max(abs(a - b) for a, b in zip(got_lp, ref_lp))
        assert err < LOGPROB_TOL, f"logprobs differ by {err:.2e} for prompt {prompt}"


def served_version(url: str):
    return requests.get(f"{url}/weight_version", timeout=10).json()["weight_version"]


def push_once(server, model, cfg: WeightSyncConfig | None = None) -> dict:
    sync = WeightSync(cfg or WeightSyncConfig(), [server.url], server.token)
    sync.connect()
    try:
        return sync.push(model, server.next_version())
    finally:
        sync.close()


# -- wire helpers (no server) ----------------------------------------------------------------

def test_plan_buckets_keeps_order_and_limits():
    sizes = [10, 30, 5, 100, 1, 1]
    assert plan_buckets(sizes, 0) == [[0], [1], [2], [3], [4], [5]]
    buckets = plan_buckets(sizes, 40)
    assert [i for b in buckets for i in b] == list(range(len(sizes)))
    for b in buckets:
        assert sum(sizes[i] for i in b) <= 40 or len(b) == 1


def test_unpack_bucket_round_trip_mixed_dtypes():
    tensors = [torch.randn(3, 5), torch.randn(7).to(torch.bfloat16), torch.arange(4, dtype=torch.int64)]
    buf = pack_bucket(tensors)
    views = unpack_bucket(buf, [list(t.shape) for t in tensors], ["float32", "bfloat16", "int64"])
    for a, b in zip(tensors, views):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_validate_manifest_names_the_tensor():
    spec = {"tensors": {"a.weight": {"shape": [2, 3]}, "lm_head.weight": {"shape": [4, 3]}},
            "tie_word_embeddings": False}
    good = {"names": ["a.weight", "lm_head.weight"], "dtypes": ["float32"] * 2, "shapes": [[2, 3], [4, 3]],
            "buckets": [[0], [1]]}
    validate_manifest(good, spec, "srv")
    with pytest.raises(ValueError, match="a.weight.*shape"):
        validate_manifest(dict(good, shapes=[[3, 3], [4, 3]]), spec, "srv")
    with pytest.raises(ValueError, match="lacks.*lm_head.weight"):
        validate_manifest(dict(good, names=["a.weight"], dtypes=["float32"], shapes=[[2, 3]], buckets=[[0]]),
                          spec, "srv")
    with pytest.raises(ValueError, match="not in the served model"):
        validate_manifest(dict(good, names=["a.weight", "b.weight"]), spec, "srv")
    with pytest.raises(ValueError, match="buckets"):
        validate_manifest(dict(good, buckets=[[0]]), spec, "srv")
    validate_manifest(dict(good, pipeline_depth=4), spec, "srv")
    for bad in (0, 17, "2", 1.5):
        with pytest.raises(ValueError, match="pipeline_depth"):
            validate_manifest(dict(good, pipeline_depth=bad), spec, "srv")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="backend"):
        WeightSyncConfig(backend="mpi")
    with pytest.raises(ValueError, match="update_timeout_s"):
        WeightSyncConfig(update_timeout_s=0)
    with pytest.raises(ValueError, match="pause_mode"):
        WeightSyncConfig(pause_mode="later")


def test_pick_backend_avoids_nccl_between_ranks_on_one_gpu():
    gpu_a, gpu_b, gpu_c = "cuda:GPU-a", "cuda:GPU-b", "cuda:GPU-c"
    # Separate GPUs: NCCL, nothing to explain.
    assert pick_backend("auto", gpu_a, {"http://s1": [gpu_b], "http://s2": [gpu_c]}) == ("nccl", "")
    # A CPU trainer, or gloo asked for: gloo.
    assert pick_backend("auto", "cpu", {"http://s1": [gpu_b]}) == ("gloo", "")
    assert pick_backend("gloo", gpu_a, {"http://s1": [gpu_b]}) == ("gloo", "")
    # Trainer colocated with a worker, or two replicas on one GPU: auto falls back to gloo and says why.
    backend, why = pick_backend("auto", gpu_a, {"http://s1": [gpu_b, gpu_a]})
    assert backend == "gloo" and "the trainer and worker 1 of http://s1 share GPU GPU-a" in why
    backend, why = pick_backend("auto", gpu_a, {"http://s1": [gpu_b], "http://s2": [gpu_b]})
    assert backend == "gloo" and "worker 0 of http://s1 and worker 0 of http://s2" in why
    # A server on CPU with a GPU trainer: gloo.
    assert pick_backend("auto", gpu_a, {"http://s1": ["cpu"]})[0] == "gloo"
    # Asking for NCCL where it cannot work is an error naming the clash, before any group forms.
    with pytest.raises(WeightSyncError, match="share GPU GPU-a"):
        pick_backend("nccl", gpu_a, {"http://s1": [gpu_a]})
    with pytest.raises(WeightSyncError, match="runs on cpu"):
        pick_backend("nccl", gpu_a, {"http://s1": ["cpu"]})
    # A server too old to report devices: the trainer's own device decides.
    assert pick_backend("auto", gpu_a, {"http://s1": None}) == ("nccl", "")
    with pytest.raises(ValueError, match="unknown transfer backend"):
        pick_backend("mpi", gpu_a, {})


@pytest.mark.vllm
def test_spec_reports_each_workers_device(vllm_server):
    spec = requests.get(f"{vllm_server.url}/weights/spec", timeout=30,
                        headers={"Authorization": f"Bearer {vllm_server.token}"}).json()
    assert spec["devices"] == ["cpu"] * spec["num_workers"]


def test_clean_param_name_strips_wrappers():
    assert clean_param_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"


# -- against the session's vLLM server --------------------------------------------------------

@pytest.mark.vllm
def test_push_after_optimizer_step_serves_trainer_weights(vllm_server):
    model = load_hf(vllm_server.model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, seed=1)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "the step changed nothing"
    sync = WeightSync(WeightSyncConfig(), [vllm_server.url], vllm_server.token)
    sync.connect()
    try:
        v1 = vllm_server.next_version()
        metrics = sync.push(model, v1)
        assert served_version(vllm_server.url) == v1
        assert metrics["sync/version"] == v1 and metrics["sync/ms"] > 0
        assert metrics["sync/bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
        assert metrics["sync/round_trips"] == 2 and metrics["sync/server_version"] == v1  # prepare + update
        assert_serves(vllm_server.url, model)
        # A second step through the same connection: the version advances, outputs follow.
        train_step(model, seed=2)
        v2 = vllm_server.next_version()
        m2 = sync.push(model, v2)
        assert served_version(vllm_server.url) == v2 > v1
        assert m2["sync/round_trips"] == 1 and m2["sync/server_version"] == v2  # same manifest: one exchange
        assert_serves(vllm_server.url, model)
    finally:
        sync.close()
    log = vllm_server.handle.process.log_path.read_text(errors="replace")
    assert "weight updates run as one EngineCore call" in log


@pytest.mark.vllm
def test_update_after_the_server_closed_the_idle_connection(vllm_server):
    """Updates keep one HTTP connection per server open; a server closes an idle one after its
    keep-alive timeout (uvicorn's, a few seconds), as between two slow steps. The next update
    notices, reconnects and lands in one exchange."""
    import select
    import time

    model = load_hf(vllm_server.model_dir)
    sync = WeightSync(WeightSyncConfig(), [vllm_server.url], vllm_server.token)
    sync.connect()
    try:
        train_step(model, seed=31)
        sync.push(model, vllm_server.next_version())
        sock = sync._channels[vllm_server.url]._conn.sock
        assert sock is not None, "the update's connection was not kept open"
        deadline = time.monotonic() + 30
        while not select.select([sock], [], [], 0.2)[0]:  # readable between exchanges = closed by the server
            assert time.monotonic() < deadline, "the server kept the idle connection open for 30 s"
        train_step(model, seed=32)
        v = vllm_server.next_version()
        m = sync.push(model, v)
        assert served_version(vllm_server.url) == v and m["sync/round_trips"] == 1
        assert_serves(vllm_server.url, model)
    finally:
        sync.close()


@pytest.mark.vllm
@pytest.mark.parametrize("pause_mode", ["keep", "wait", "abort"])
def test_update_while_generating(vllm_server, pause_mode):
    """An update that arrives while a long generation runs, in each pause mode: the update lands,
    generation resumes, and the request ends as the mode says: "keep" and "wait" deliver every
    token (keep: the later ones sampled on the new weights, after the running sequences' KV was
    recomputed; wait: the request drains first), "abort" cuts it short. Then the server serves the
    new weights.

    The request is streamed (`/v1/completions`) and the update is sent once its first tokens have
    arrived: then it is generating in the engine, not still on its way there (which no fixed sleep
    ensures on a loaded machine; an "abort" pause does not cancel a request the engine has not seen).
    500 tokens is all the model length allows; the top-20 logprobs of every token make the request
    last seconds (~1 s without them), long enough for the update to arrive mid-generation."""
    import json

    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=20 + ["keep", "wait", "abort"].index(pause_mode))
    sync = WeightSync(WeightSyncConfig(pause_mode=pause_mode), [vllm_server.url], vllm_server.token)
    sync.connect()
    served = requests.get(f"{vllm_server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": served, "prompt": PROMPTS[0], "n": 4, "max_tokens": 500, "ignore_eos": True,
            "temperature": 1.0, "seed": 1, "logprobs": 20, "stream": True, "return_token_ids": True}
    tokens, finish = [0] * 4, [None] * 4
    try:
        with requests.post(f"{vllm_server.url}/v1/completions", json=body, stream=True, timeout=120) as answer:
            assert answer.status_code == 200, answer.text
            pushed = None
            for line in answer.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                for choice in json.loads(line[len(b"data: "):])["choices"]:
                    tokens[choice["index"]] += len(choice["token_ids"])
                    finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
                if pushed is None:
                    assert None in finish, "the generation ended before the update: make it longer"
                    pushed = vllm_server.next_version()
                    sync.push(model, pushed)
    finally:
        sync.close()
    assert served_version(vllm_server.url) == pushed
    if pause_mode == "abort":
        assert set(finish) == {"abort"} and max(tokens) < 500, (finish, tokens)
    else:
        assert tokens == [500] * 4 and set(finish) == {"length"}, (finish, tokens)
    assert_serves(vllm_server.url, model)


def prometheus(url: str, name: str) -> float:
    """The sum of a metric's samples on the server's `/metrics` (a read of the API process's
    counters: no request reaches the engine)."""
    total, found = 0.0, False
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total, found = total + float(line.rsplit(" ", 1)[1]), True
    assert found, f"{name} is not among {url}/metrics"
    return total


@pytest.mark.vllm
def test_updates_while_requests_finish_keep_generating(vllm_server):
    """Updates that land while requests finish step after step: the engine generates again after
    each, with no other request to wake it.

    When a request finished in the engine's last step, its pause cannot complete at once, and our
    one-call update finishes (and resumes the scheduler) from vLLM's idle-state callback, just
    before the busy loop blocks on its input queue; without `engine_ext._wake` the resumed
    requests then sat unscheduled until the next request of any kind arrived.

    The requests come in waves of 60, of 4, 6, ..., 122 tokens, so that one finishes every other
    step. Once a wave's first request is done and 20 or more still run or wait, the trainer pushes
    an update, waits for the server's generated-token count to move (read from `/metrics`, which
    sends nothing to the engine), and pushes again while 20 remain; the next wave starts only
    after the last one is done, so no new request wakes a stalled engine. Waves repeat until 8
    updates have landed this way (a fast machine can finish a wave before its first push)."""
    import threading
    import time

    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=41)
    url = vllm_server.url
    served = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def ask(k: int, status: list[int]) -> None:
        r = requests.post(f"{url}/v1/completions", timeout=300, json={
            "model": served, "prompt": PROMPTS[1], "max_tokens": k, "ignore_eos": True, "temperature": 1.0})
        status.append(r.status_code)

    def wait_for(what: str, ok, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
            time.sleep(0.005)

    def queued() -> float:
        return prometheus(url, "vllm:num_requests_running") + prometheus(url, "vllm:num_requests_waiting")

    sync = WeightSync(WeightSyncConfig(), [url], vllm_server.token)
    sync.connect()
    pushed: list[int] = []
    statuses: list[int] = []
    waves = 0
    try:
        while len(pushed) < 8 and waves < 20:
            waves += 1
            status: list[int] = []
            wave = [threading.Thread(target=ask, args=(k, status), daemon=True) for k in range(4, 124, 2)]
            for t in wave:
                t.start()
            try:
                wait_for(f"wave {waves}'s first request done", lambda: len(status) >= 1, 120)
                while len(pushed) < 8 and queued() >= 20:  # an update preempts every running request
                    pushed.append(vllm_server.next_version())
                    sync.push(model, pushed[-1])
                    after = prometheus(url, "vllm:generation_tokens_total")
                    # Moving on, or the wave done (its last requests can end between the two reads).
                    wait_for(f"generation going on after update v{pushed[-1]} (wave {waves})",
                             lambda: prometheus(url, "vllm:generation_tokens_total") > after
                             or len(status) == len(wave))
            finally:
                deadline = time.monotonic() + 120
                for t in wave:
                    t.join(timeout=max(0.0, deadline - time.monotonic()))
                statuses += status
    finally:
        sync.close()
    assert len(pushed) == 8, f"only {len(pushed)} updates landed while requests ran, in {waves} waves"
    assert statuses == [200] * len(statuses), statuses
    assert served_version(url) == pushed[-1]
    assert_serves(url, model)


@pytest.mark.vllm
def test_packed_buckets_give_the_same_weights(vllm_server):
    """The NCCL-style packed path (several tensors per message) over gloo."""
    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=3)
    push_once(vllm_server, model, WeightSyncConfig(bucket_bytes=300_000))
    assert_serves(vllm_server.url, model)


@pytest.mark.vllm
@pytest.mark.slow
class TestTiedEmbeddings:
    """Both layouts' servers (`vllm_tied_servers`) live while this class runs, and only then."""

    @pytest.mark.parametrize("layout", ["plain", "packed"])
    def test_push_tied_embeddings(self, vllm_tied_servers, layout):
        """Tied embeddings, in place ("plain" CPU layout, reused receive buffers) and through the
        layerwise reload ("packed"): two real steps, each followed by a push (tensor by tensor, then
        packed buckets), and vLLM serves the trainer's weights after each."""
        vllm_tied_server = vllm_tied_servers[layout]
        model = load_hf(vllm_tied_server.model_dir)
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        # The first push sends tensor by tensor, the second packs several tensors per message.
        for seed, cfg in ((4, WeightSyncConfig(bucket_bytes=0)), (5, WeightSyncConfig(bucket_bytes=300_000))):
            train_step(model, seed=seed)
            metrics = push_once(vllm_tied_server, model, cfg)
            assert served_version(vllm_tied_server.url) == metrics["sync/version"]
            assert_serves(vllm_tied_server.url, model)
        assert vllm_tied_server.cpu_weight_layout == layout
        expected = "in place" if layout == "plain" else "layerwise"
        log = vllm_tied_server.handle.process.log_path.read_text(errors="replace")
        assert f"weight updates load {expected}" in log, f"the {layout} server did not load {expected}"


@pytest.mark.vllm
def test_update_without_token_is_refused(vllm_server):
    manifest = {"names": [], "dtypes": [], "shapes": [], "buckets": [], "version": 1}
    version = served_version(vllm_server.url)
    for route in ("/weights/prepare", "/weights/update", "/weights/init"):
        r = requests.post(f"{vllm_server.url}{route}", json={"manifest": manifest, "version": 1}, timeout=10)
        assert r.status_code == 401, route
        r = requests.post(f"{vllm_server.url}{route}", json={"manifest": manifest, "version": 1}, timeout=10,
                          headers={"Authorization": "Bearer " + "x" * 40})
        assert r.status_code == 403, route
    assert requests.get(f"{vllm_server.url}/weights/spec", timeout=10).status_code == 401
    assert served_version(vllm_server.url) == version
    log = vllm_server.handle.process.log_path.read_text(errors="replace")
    assert "refused POST /weights/prepare" in log


@pytest.mark.vllm
def test_oversized_body_is_refused(vllm_server):
    r = requests.post(f"{vllm_server.url}/weights/prepare", data=b"{" + b" " * (9 << 20) + b"}", timeout=30,
                      headers={"Authorization": f"Bearer {vllm_server.token}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]


@pytest.mark.vllm
def test_shape_mismatch_fails_before_sending(vllm_server, tmp_path):
    """A trainer model whose shapes differ: one WeightSyncError naming server and tensor, checked on
    the trainer and (with that check off) by the server, and the server keeps serving."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config.from_pretrained(str(vllm_server.model_dir))
    cfg.intermediate_size = 2 * cfg.intermediate_size
    wrong = Qwen2ForCausalLM(cfg)
    version = served_version(vllm_server.url)
    for validate in (True, False):
        with pytest.raises(WeightSyncError) as info:
            push_once(vllm_server, wrong, WeightSyncConfig(validate_shapes=validate))
        msg = str(info.value)
        assert vllm_server.url in msg or "this server" in msg
        assert "mlp" in msg and "shape" in msg, msg
    assert served_version(vllm_server.url) == version
    assert requests.get(f"{vllm_server.url}/weight_version", timeout=10).json()["phase"] == "idle"
    out = vllm_generate(vllm_server.url, PROMPTS[0], n=1, max_tokens=2, temperature=0.0)
    assert len(out["token_ids"][0]) == 2


@pytest.mark.vllm
def test_one_exchange_update_needs_a_known_manifest(vllm_server):
    """`/weights/update` with a manifest the server never prepared: 409, nothing paused."""
    headers = {"Authorization": f"Bearer {vllm_server.token}"}
    r = requests.post(f"{vllm_server.url}/weights/update", json={"manifest_key": "0" * 32, "version": 1},
                      headers=headers, timeout=10)
    assert r.status_code == 409 and r.json()["code"] == "manifest_unknown"
    assert requests.post(f"{vllm_server.url}/weights/update", json={"version": 1}, headers=headers,
                         timeout=10).status_code == 400
    assert requests.post(f"{vllm_server.url}/weights/update", json={"manifest_key": "x", "version": 1},
                         timeout=10).status_code == 401
    assert requests.get(f"{vllm_server.url}/weight_version", timeout=10).json()["phase"] == "idle"
    out = vllm_generate(vllm_server.url, PROMPTS[0], n=1, max_tokens=2, temperature=0.0)
    assert len(out["token_ids"][0]) == 2


class _DiesMidway(WeightSync):
    """Fault injection: the trainer stops producing tensors half-way through an update."""

    def _gathered(self, params):
        for i, t in enumerate(super()._gathered(params)):
            if i == len(params) // 2:
                raise RuntimeError("trainer died")
            yield t


@pytest.mark.vllm
def test_failed_update_raises_once_and_server_resumes(vllm_server):
    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=5)
    sync = _DiesMidway(WeightSyncConfig(update_timeout_s=3), [vllm_server.url], vllm_server.token)
    sync.connect()
    with pytest.raises(WeightSyncError, match="trainer died"):
        sync.push(model, vllm_server.next_version())
    sync.close()
    state = requests.get(f"{vllm_server.url}/weight_version", timeout=10).json()
    assert state["weight_version"] is None and "failed" in state["last_error"]
    assert state["phase"] == "idle"
    # Not left paused: generation answers promptly.
    r = requests.post(f"{vllm_server.url}/generate", json={"prompt": {"prompt_token_ids": PROMPTS[0]},
                                                           "max_tokens": 2, "temperature": 0.0}, timeout=30)
    assert r.status_code == 200
    # A fresh connection recovers a consistent state.
    push_once(vllm_server, model)
    assert_serves(vllm_server.url, model)


class _InterruptedMidway(WeightSync):
    """Fault injection: Ctrl-C arrives half-way through an update's broadcast."""

    def _gathered(self, params):
        for i, t in enumerate(super()._gathered(params)):
            if i == len(params) // 2:
                raise KeyboardInterrupt
            yield t


@pytest.mark.vllm
def test_interrupted_update_stops_at_once_and_server_resumes(vllm_server):
    """Ctrl-C during a push is the user stopping the run: it comes out of `push` as the
    KeyboardInterrupt itself, at once (not after the servers' answers, up to `update_timeout_s`
    later, wrapped as a failed update, which made the driver report a failed run, exit 1). The
    server's receive times out on its own, it resumes, and a new connection updates it."""
    import time

    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=9)
    sync = _InterruptedMidway(WeightSyncConfig(update_timeout_s=5), [vllm_server.url], vllm_server.token)
    sync.connect()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sync.push(model, vllm_server.next_version())
    assert time.monotonic() - t0 < 3, "push waited for the servers after the interrupt"
    sync.close()
    deadline = time.monotonic() + 60
    while (state := requests.get(f"{vllm_server.url}/weight_version", timeout=10).json())["phase"] != "idle":
        assert time.monotonic() < deadline, f"the server did not give up the interrupted update: {state}"
        time.sleep(0.1)
    assert "failed" in state["last_error"]
    r = requests.post(f"{vllm_server.url}/generate", json={"prompt": {"prompt_token_ids": PROMPTS[0]},
                                                           "max_tokens": 2, "temperature": 0.0}, timeout=30)
    assert r.status_code == 200
    push_once(vllm_server, model)
    assert_serves(vllm_server.url, model)


class _DiesOnSecondPush(_DiesMidway):
    pushes = 0

    def _gathered(self, params):
        self.pushes += 1
        yield from (super()._gathered(params) if self.pushes == 2 else WeightSync._gathered(self, params))


@pytest.mark.vllm
def test_failed_one_exchange_update_raises_and_server_resumes(vllm_server):
    """The same failure on the one-exchange path (second push, manifest known)."""
    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=7)
    sync = _DiesOnSecondPush(WeightSyncConfig(update_timeout_s=3), [vllm_server.url], vllm_server.token)
    sync.connect()
    try:
        assert sync.push(model, vllm_server.next_version())["sync/round_trips"] == 2
        with pytest.raises(WeightSyncError, match="trainer died"):
            sync.push(model, vllm_server.next_version())
    finally:
        sync.close()
    state = requests.get(f"{vllm_server.url}/weight_version", timeout=10).json()
    assert state["weight_version"] is None and state["phase"] == "idle"
    push_once(vllm_server, model)
    assert_serves(vllm_server.url, model)


@pytest.mark.vllm
@pytest.mark.slow
def test_two_replicas_join_one_group(vllm_server, vllm_second_server):
    """Data-parallel replicas: both servers' workers join one group and receive one broadcast. The
    second replica runs updates as vLLM's chain of calls (`ATROPOS_ONE_CALL_UPDATE=off`), the
    first as one EngineCore call: both serve the trainer's weights."""
    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=6)
    sync = WeightSync(WeightSyncConfig(), [vllm_server.url, vllm_second_server.url], vllm_server.token)
    sync.connect()
    try:
        version = vllm_server.next_version()
        sync.push(model, version)
    finally:
        sync.close()
    for server in (vllm_server, vllm_second_server):
        assert served_version(server.url) == version
        assert_serves(server.url, model)
    log = vllm_second_server.handle.process.log_path.read_text(errors="replace")
    assert "weight updates run as vLLM's chain of calls" in log


# -- FSDP2: two trainer ranks ---------------------------------------------------------------

def _fsdp_rank(rank: int, world: int, port: int, model_dir: str, url: str, token: str, version: int,
               out_path: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_hf(model_dir)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        train_step(model, seed=10 + rank)  # each rank its own batch, as in data-parallel training
        sync = WeightSync(WeightSyncConfig(), [url], token, rank=rank, world_size=world)
        sync.connect()
        metrics = sync.push(model, version)
        sync.close()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"state": full, "metrics": metrics}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.vllm
@pytest.mark.slow
def test_fsdp2_two_ranks_push(vllm_server, tmp_path):
    import torch.multiprocessing as mp

    from atropos_core.services import free_port

    version = vllm_server.next_version()
    out = tmp_path / "fsdp_state.pt"
    mp.spawn(_fsdp_rank, args=(2, free_port(), str(vllm_server.model_dir), vllm_server.url,
                               vllm_server.token, version, str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    assert saved["metrics"]["sync/version"] == version
    model = load_hf(vllm_server.model_dir)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(saved["state"], strict=False)
    assert any(not torch.equal(original[n], p) for n, p in model.named_parameters())
    assert served_version(vllm_server.url) == version
    assert_serves(vllm_server.url, model)


@pytest.mark.vllm
def test_staleness_from_the_versions_the_server_recorded(vllm_server):
    """/generate records which weight version produced each sequence; the trainer reads it back."""
    model = load_hf(vllm_server.model_dir)
    train_step(model, seed=8)
    sync = WeightSync(WeightSyncConfig(), [vllm_server.url], vllm_server.token)
    sync.connect()
    try:
        v = vllm_server.next_version()
        sync.push(model, v)
        out = vllm_generate(vllm_server.url, PROMPTS[1], n=2, max_tokens=3, temperature=1.0)
        groups = [{"tokens": [PROMPTS[1] + ids for ids in out["token_ids"]]},
                  {"tokens": [[7, 7, 7, 7, 7, 7, 7, 7, 7]]}]  # never generated here
        m = sync.staleness_async(groups, v + 2).result(timeout=30)
        assert m["data/staleness_mean"] == m["data/staleness_max"] == m["data/staleness_min"] == 2
        assert m["data/staleness_unknown"] == 1
        assert sync.staleness([{"tokens": "not a list"}], v) == {}  # malformed groups are skipped
    finally:
        sync.close()
    r = requests.post(f"{vllm_server.url}/weights/sampled_versions", json={"keys": [1, 2]},
                      headers={"Authorization": f"Bearer {vllm_server.token}"}, timeout=10)
    assert r.status_code == 400
    assert requests.post(f"{vllm_server.url}/weights/sampled_versions", json={"keys": []},
                         timeout=10).status_code == 401
