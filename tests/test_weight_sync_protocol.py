"""The weight-sync protocol without vLLM: what both ends import (`atropos_core.weight_sync.protocol`)
and the server's route guards (token, body, manifest) on our FastAPI routes with no engine behind
them. The real-vLLM behaviour of the same routes is in tests/test_weight_sync.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atropos_core.weight_sync.protocol import (
    BUCKET_ALIGN,
    DTYPE_NAMES,
    MAX_PIPELINE_DEPTH,
    WIRE_DTYPES,
    auth_headers,
    bucket_layout,
    build_manifest,
    manifest_key,
    pack_bucket,
    plan_buckets,
    sequence_key,
    tensor_nbytes,
    token_refusal,
    unpack_bucket,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t" * 32


def _manifest(**over) -> dict:
    m = build_manifest(3, ["a.weight", "b.bias", "c.weight"], [[2, 3], [5], [4, 2]],
                       ["float32", "bfloat16", "float32"], bucket_bytes=0, pipeline_depth=2)
    m.update(over)
    return m


def test_protocol_imports_no_http_client_or_thread_pool():
    code = ("import sys; import atropos_core.weight_sync.protocol, atropos_core.weight_sync.transport; "
            "bad = [m for m in ('requests', 'urllib3', 'atropos_core.weight_sync.push', 'vllm') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_dtype_names_round_trip_and_sizes():
    assert set(DTYPE_NAMES) == set(WIRE_DTYPES.values())
    for name, dtype in WIRE_DTYPES.items():
        assert DTYPE_NAMES[dtype] == name
        assert tensor_nbytes([3, 5], name) == torch.empty(3, 5, dtype=dtype).nbytes
    assert tensor_nbytes([], "float32") == 4  # a scalar
    assert tensor_nbytes([0, 7], "bfloat16") == 0


def test_build_manifest_plans_buckets_from_wire_sizes():
    m = _manifest()
    assert m["total_bytes"] == 2 * 3 * 4 + 5 * 2 + 4 * 2 * 4
    assert m["buckets"] == [[0], [1], [2]]
    packed = build_manifest(0, m["names"], m["shapes"], m["dtypes"], bucket_bytes=40, pipeline_depth=1)
    assert packed["buckets"] == [[0, 1], [2]]  # 24 + 10 <= 40, then 32 would overflow
    assert json.loads(json.dumps(m)) == m  # travels as JSON unchanged
    validate_manifest(m, None, "srv")
    validate_manifest(packed, None, "srv")


def test_manifest_key_ignores_the_version_only():
    m = _manifest()
    assert manifest_key(m) == manifest_key(dict(m, version=99, total_bytes=0))
    assert manifest_key(m) != manifest_key(dict(m, shapes=[[3, 2], [5], [4, 2]]))
    assert manifest_key(m) != manifest_key(dict(m, buckets=[[0, 1], [2]]))
    assert manifest_key(m) != manifest_key(dict(m, pipeline_depth=1))
    assert manifest_key(m) == manifest_key({k: v for k, v in m.items() if k != "pipeline_depth"})  # default 2


def test_bucket_layout_is_aligned_for_odd_sizes():
    shapes, dtypes = [[3], [1], [5, 3], [2]], ["uint8", "bfloat16", "float64", "bool"]
    offsets, total = bucket_layout(shapes, dtypes)
    assert offsets[0] == 0 and all(o % BUCKET_ALIGN == 0 for o in offsets)
    for o, nxt, s, d in zip(offsets, offsets[1:] + [total], shapes, dtypes):
        assert nxt - o >= tensor_nbytes(s, d) and nxt - o < tensor_nbytes(s, d) + BUCKET_ALIGN
    tensors = [torch.tensor([1, 2, 255], dtype=torch.uint8), torch.tensor([-1.5]).bfloat16(),
               torch.randn(5, 3, dtype=torch.float64), torch.tensor([True, False])]
    buf = pack_bucket(tensors)
    assert buf.dtype == torch.uint8 and buf.numel() == total
    for a, b in zip(tensors, unpack_bucket(buf, shapes, dtypes)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_plan_buckets_gives_an_oversized_tensor_its_own_bucket():
    assert plan_buckets([5, 100, 5, 5], 10) == [[0], [1], [2, 3]]
    assert plan_buckets([], 10) == []


@pytest.mark.parametrize("change, message", [
    ({"names": "a.weight"}, "needs lists"),
    ({"dtypes": ["float32"]}, "differ in length"),
    ({"names": ["a.weight", "a.weight", "c.weight"]}, "names a tensor twice"),
    ({"names": ["a.weight", 7, "c.weight"]}, "names' must be non-empty strings"),
    ({"dtypes": ["float32", "complex64", "float32"]}, "'b.bias' has unsupported dtype 'complex64'"),
    ({"dtypes": ["float32", ["bfloat16"], "float32"]}, "'b.bias' has unsupported dtype"),
    ({"shapes": [[2, 3], [-5], [4, 2]]}, "'b.bias' has a bad shape"),
    ({"shapes": [[2, 3], [5.0], [4, 2]]}, "'b.bias' has a bad shape"),
    ({"shapes": [[2, 3], [True], [4, 2]]}, "'b.bias' has a bad shape"),
    ({"buckets": [[0], [2], [1]]}, "in order"),
    ({"buckets": [[0], [], [1], [2]]}, "buckets"),
    ({"buckets": [[0], 1, [2]]}, "buckets"),
    ({"buckets": [[0], ["1"], [2]]}, "buckets"),
    ({"buckets": [[0, 1, 2, 2]]}, "exactly once"),
    ({"version": "3"}, "'version' must be a non-negative integer"),
    ({"version": -1}, "'version'"),
    ({"pipeline_depth": MAX_PIPELINE_DEPTH + 1}, "pipeline_depth"),
])
def test_malformed_manifest_is_rejected_with_a_clear_error(change, message):
    with pytest.raises(ValueError, match="^srv: .*" + message.replace("[", r"\[").replace("(", r"\(")):
        validate_manifest(_manifest(**change), None, "srv")


def test_non_dict_manifest_is_rejected():
    for bad in (None, [], "x"):
        with pytest.raises(ValueError, match="manifest must be a JSON object"):
            validate_manifest(bad, None, "srv")


def test_tied_embeddings_need_no_lm_head():
    spec = {"tensors": {"embed.weight": {"shape": [8, 4]}, "lm_head.weight": {"shape": [8, 4]}},
            "tie_word_embeddings": True}
    m = build_manifest(1, ["embed.weight"], [[8, 4]], ["float32"], bucket_bytes=0, pipeline_depth=2)
    validate_manifest(m, spec, "srv")
    with pytest.raises(ValueError, match="lacks 1 tensor.*lm_head.weight"):
        validate_manifest(m, dict(spec, tie_word_embeddings=False), "srv")


def test_token_refusal():
    assert auth_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}
    assert token_refusal(auth_headers(TOKEN)["Authorization"], TOKEN) is None
    assert token_refusal("", TOKEN) == "no token"
    assert token_refusal("Bearer ", TOKEN) == "no token"
    assert token_refusal(TOKEN, TOKEN) == "no token"  # not a bearer header
    assert token_refusal(f"Basic {TOKEN}", TOKEN) == "no token"
    assert token_refusal("Bearer " + TOKEN[:-1], TOKEN) == "wrong token"
    assert token_refusal(f"Bearer {TOKEN}x", TOKEN) == "wrong token"
    assert token_refusal("Bearer anything", "") == "wrong token"  # a server without a token admits no one


def test_sequence_key_depends_on_every_token():
    assert sequence_key([1, 2, 3]) == sequence_key((1, 2, 3)) == sequence_key([torch.tensor(1).item(), 2, 3])
    assert len({sequence_key(t) for t in ([1, 2, 3], [1, 2], [1, 23], [12, 3], [3, 2, 1])}) == 5


# -- the server's route guards, with no engine behind them ---------------------------------------

def _engine_less_app(ckpt: Path):
    """Our routes on a bare FastAPI app with no engine behind them, serving checkpoint `ckpt`."""
    from fastapi import FastAPI

    from atropos_core.inference.server import add_atropos_routes

    app = FastAPI()
    app.state.engine_client = None  # no engine: only answers given before one is needed are tested
    app.middleware_stack = app.build_middleware_stack()  # as vLLM's app has by the time our routes come
    add_atropos_routes(app, token=TOKEN, max_body_bytes=4096, model=str(ckpt))
    return app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny safetensors directory in two shards."""
    from safetensors.torch import save_file

    ckpt = tmp_path_factory.mktemp("ckpt")
    save_file({"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(5, dtype=torch.bfloat16)},
              str(ckpt / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"c.weight": torch.zeros(4, 2)}, str(ckpt / "model-00002-of-00002.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    return ckpt


@pytest.fixture(scope="module")
def guarded_app(checkpoint):
    from fastapi.testclient import TestClient

    from atropos_core.inference.server import _checkpoint_spec

    with TestClient(_engine_less_app(checkpoint)) as client:
        yield client, _checkpoint_spec(str(checkpoint))


def test_checkpoint_spec_reads_every_safetensors_file(guarded_app):
    _, spec = guarded_app
    assert spec == {"tie_word_embeddings": False, "tensors": {
        "a.weight": {"shape": [2, 3], "dtype": "F32"}, "b.bias": {"shape": [5], "dtype": "BF16"},
        "c.weight": {"shape": [4, 2], "dtype": "F32"}}}


ROUTES = [("GET", "/weights/spec"), ("POST", "/weights/init"), ("POST", "/weights/prepare"),
          ("POST", "/weights/update"), ("POST", "/weights/sampled_versions"), ("POST", "/weights/load_from_disk")]


@pytest.mark.parametrize("method, route", ROUTES)
def test_every_weight_route_checks_the_token_before_the_body(guarded_app, method, route):
    client, _ = guarded_app
    big = "x" * 10_000  # over the body limit: the token is refused first
    r = client.request(method, route, content=big)
    assert r.status_code == 401 and r.json() == {"error": "weight routes need the update token"}
    r = client.request(method, route, content=big, headers={"Authorization": "Bearer " + "u" * 32})
    assert r.status_code == 403 and "update token" in r.json()["error"]


@pytest.mark.parametrize("route", [r for m, r in ROUTES if m == "POST"])
def test_weight_routes_refuse_bad_bodies(guarded_app, route):
    client, _ = guarded_app
    h = auth_headers(TOKEN)
    r = client.post(route, content="x" * 10_000, headers=h)
    assert r.status_code == 413 and "over 4096 bytes" in r.json()["error"]
    r = client.post(route, content="{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]
    r = client.post(route, content="[1, 2]", headers=h)
    assert r.status_code == 400 and r.json()["error"] == "request body must be a JSON object"
    r = client.post(route, content="[" * 2000 + "]" * 2000, headers=h)
    assert r.status_code in (400, 413) and r.json()["error"]


def test_prepare_rejects_a_malformed_or_mismatched_manifest(guarded_app):
    client, _ = guarded_app
    h = auth_headers(TOKEN)
    cases = [
        ({}, "needs a 'manifest' object"),
        ({"manifest": _manifest(buckets=[[0], [2], [1]])}, "in order"),
        ({"manifest": _manifest(shapes=[[3, 2], [5], [4, 2]])}, "'a.weight' has shape [3, 2], the served model has [2, 3]"),
        ({"manifest": _manifest(names=["a.weight", "b.bias", "d.weight"])}, "'d.weight' is not in the served model"),
        ({"manifest": _manifest(version="soon")}, "manifest 'version' must be a non-negative integer"),
    ]
    for body, message in cases:
        r = client.post("/weights/prepare", json=body, headers=h)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)


def test_routes_that_need_no_engine_answer(guarded_app):
    client, _ = guarded_app
    h = auth_headers(TOKEN)
    r = client.post("/weights/sampled_versions", json={"keys": [sequence_key([1, 2])]}, headers=h)
    assert r.status_code == 200 and r.json() == {"versions": [None]}
    r = client.post("/weights/sampled_versions", json={"keys": [1]}, headers=h)
    assert r.status_code == 400 and "list of strings" in r.json()["error"]
    r = client.post("/weights/update", json={"manifest_key": "k", "version": 1}, headers=h)
    assert r.status_code == 409 and r.json()["code"] == "manifest_unknown"
    for body in ({"manifest_key": "k"}, {"manifest_key": 3, "version": 1}, {"manifest_key": "k", "version": 1,
                                                                           "pause_mode": "later"}):
        r = client.post("/weights/update", json=body, headers=h)
        assert r.status_code == 400 and "/weights/update needs" in r.json()["error"], body
    r = client.post("/weights/init", json={"host": "127.0.0.1"}, headers=h)
    assert r.status_code == 400 and "/weights/init needs" in r.json()["error"]
    r = client.post("/weights/load_from_disk", json={"path": "/nonexistent", "version": 1}, headers=h)
    assert r.status_code == 400 and "not a directory of .safetensors" in r.json()["error"]
    assert client.get("/weight_version").json() == {"weight_version": 0, "phase": "idle", "last_error": None}


def test_prepare_needs_no_engine_and_a_failed_update_is_reported_after_ready(checkpoint):
    """`/weights/prepare` only validates and remembers (no engine is touched), answering the same
    key the trainer computes; `/weights/update` with it streams "ready", then, when the update
    itself fails (here: no engine at all), a result line with the error, and the server claims no
    version until the next good update, and is idle again."""
    from fastapi.testclient import TestClient

    h = auth_headers(TOKEN)
    with TestClient(_engine_less_app(checkpoint)) as client:
        r = client.post("/weights/prepare", json={"manifest": _manifest()}, headers=h)
        assert r.status_code == 200 and r.json() == {"status": "prepared", "manifest_key": manifest_key(_manifest())}
        assert client.get("/weight_version").json()["phase"] == "idle"
        r = client.post("/weights/update", json={"manifest_key": manifest_key(_manifest()), "version": 4}, headers=h)
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert lines[0] == {"status": "ready"} and len(lines) == 2, lines
        assert lines[1]["http_status"] == 500 and "v4 failed on this server" in lines[1]["error"]
        state = client.get("/weight_version").json()
        assert state["weight_version"] is None and "v4 failed" in state["last_error"] and state["phase"] == "idle"


# -- the EngineCore side of a one-call update, on a protocol double of the engine ---------------

class _Engine:
    """What `engine_ext.atropos_update` calls on vLLM's EngineCore, recorded; `fail` names the
    call that raises, `pending` makes the pause wait (a Future, as vLLM's does for in-flight work)."""

    def __init__(self, fail: str = "", pending: bool = False):
        from concurrent.futures import Future

        self.calls: list[str] = []
        self.fail = fail
        self.pause_future = Future() if pending else None
        self.version = "default"
        self.scheduler = self

    def _call(self, name: str):
        self.calls.append(name)
        if self.fail == name:
            raise RuntimeError(f"{name} broke")

    def pause_scheduler(self, mode, clear_cache):
        self._call(f"pause:{mode}:{clear_cache}")
        return self.pause_future

    def collective_rpc(self, method, kwargs=None):
        self._call(f"rpc:{method}:v{kwargs['update_info']['version']}")

    def reset_prefix_cache(self, reset_running_requests=False):
        self._call(f"reset_prefix:{reset_running_requests}")
        return True

    def reset_encoder_cache(self):
        self._call("reset_encoder")

    def set_weight_version(self, version):
        self._call("version")
        self.version = version

    def resume_scheduler(self):
        self._call("resume")


def test_one_call_update_runs_in_order_and_always_resumes():
    from atropos_core.inference.engine_ext import WORKER_UPDATE_RPC, atropos_update

    info = {"version": 7}
    eng = _Engine()
    assert atropos_update(eng, info, "7", "keep") == {"weight_version": "7"}
    assert eng.calls == ["pause:keep:False", f"rpc:{WORKER_UPDATE_RPC}:v7", "reset_prefix:True", "reset_encoder",
                         "version", "resume"] and eng.version == "7"
    for broken in ("pause:keep:False", f"rpc:{WORKER_UPDATE_RPC}:v7", "reset_prefix:True"):
        eng = _Engine(fail=broken)
        with pytest.raises(RuntimeError, match="broke"):
            atropos_update(eng, info, "7", "keep")
        assert eng.calls[-1] == "resume" and eng.calls.count("resume") == 1, eng.calls
        assert eng.version == "default", "a failed update must not claim the new version"


def test_one_call_update_waits_for_a_pending_pause():
    from atropos_core.inference.engine_ext import atropos_update

    eng = _Engine(pending=True)
    answer = atropos_update(eng, {"version": 3}, "3", "wait")
    assert not answer.done() and eng.calls == ["pause:wait:False"]  # nothing loaded before the pause completes
    eng.pause_future.set_result(None)                                # the engine went idle
    assert answer.result(timeout=1) == {"weight_version": "3"} and eng.calls[-1] == "resume"
    eng = _Engine(pending=True)
    answer = atropos_update(eng, {"version": 3}, "3", "wait")
    eng.pause_future.set_exception(RuntimeError("pause broke"))
    with pytest.raises(RuntimeError, match="pause broke"):
        answer.result(timeout=1)
    assert eng.calls == ["pause:wait:False", "resume"]
