"""Security: nobody but the trainer drives our servers.

- Every TCP socket that our processes listen on is bound to loopback: checked on the live sockets
  (each process's sockets, read with psutil), not on command lines. The
  whole process tree of a running driver (vLLM server with its engine processes, the weight-sync
  TCPStore) is checked in `tests/test_reliability.py::test_driver_survives_faults`; here the API
  started by `RunServices`, the session's vLLM server and the weight-sync store.
- Every weight route of our inference server refuses a request without the per-launch token (401)
  or with a wrong one (403) and logs the refusal; the set of routes is read from the live server's
  OpenAPI schema, so a route added later is covered too; vLLM's unauthenticated dev-mode routes
  are absent. (The four update routes' refusal is also in tests/test_weight_sync.py; here every
  route, including `/weights/load_from_disk`, which makes the server read a path from its disk.)
- Request bodies on our routes are size-limited (`/generate` here; `/weights/prepare` in
  tests/test_weight_sync.py::test_oversized_body_is_refused).
- Nothing from the network is unpickled: a scan of the library and driver source for pickle
  loads, `torch.load` without `weights_only=True`, object collectives (they pickle) and
  `allow_pickle=True`.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import requests

from tests.fixtures.processes import assert_tree_listens_on_loopback_only, is_loopback, listening_sockets

REPO = Path(__file__).resolve().parents[1]


def test_listening_sockets_are_found():
    """The socket reader sees the live sockets: a socket we bind ourselves is found as bound."""
    import socket

    with socket.socket() as s, socket.socket(socket.AF_INET6) as s6:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s6.bind(("::", 0))
        s6.listen()
        ports = {s.getsockname()[1]: "127.0.0.1", s6.getsockname()[1]: "::"}
        mine = {port: addr for _, addr, port in listening_sockets({os.getpid()}) if port in ports}
    assert mine == ports
    assert not is_loopback("0.0.0.0") and is_loopback("::ffff:127.0.0.1") and is_loopback("::1")


@pytest.mark.api
def test_run_services_api_binds_loopback(tmp_path):
    from atropos_core.services import RunServices

    services = RunServices(tmp_path)
    try:
        url = services.start_api()
        socks = assert_tree_listens_on_loopback_only(services.api.pid)
        assert any(port == int(url.rsplit(":", 1)[1]) for _, _, port in socks)
    finally:
        services.stop_all()


def test_every_server_defaultis_loopback():
    """The defaults a user gets without asking: config fields and the launch helpers."""
    import inspect

    from atropos_core.config import InferenceConfig
    from atropos_core.inference.vllm_command import vllm_server_command
    from atropos_core.services import RunServices, start_atropos_api, start_vllm_server
    from atropos_core.weight_sync import WeightSyncConfig

    assert InferenceConfig().host == "127.0.0.1"
    assert WeightSyncConfig().master_address in ("127.0.0.1", "localhost")
    for fn in (start_atropos_api, start_vllm_server, vllm_server_command, RunServices.__init__):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn.__qualname__


# ---- the inference server --------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_server_listens_on_loopback_only(vllm_server):
    assert_tree_listens_on_loopback_only(vllm_server.handle.process.pid)


@pytest.mark.vllm
def test_weight_sync_store_listens_on_loopback_only(vllm_server):
    """The trainer's rendezvous store for the weight transfer (the vLLM workers join it) is a server
    too: anyone who reaches it could join the transfer group. Given only a host, torch's TCPStore
    master listens on '::' (every interface): WeightSync must hand it a socket bound to loopback."""
    import torch

    from atropos_core.weight_sync import WeightSync, WeightSyncConfig

    before = {port for _, _, port in listening_sockets({os.getpid()})}
    sync = WeightSync(WeightSyncConfig(), [vllm_server.url], vllm_server.token, 0, 1)
    sync.connect(torch.device("cpu"))
    try:
        new = [s for s in listening_sockets({os.getpid()}) if s[2] not in before]
        assert new, "connect() opened no listening socket: the check would be empty"
        exposed = [s for s in new if not is_loopback(s[1])]
        assert not exposed, f"weight-sync store listening beyond loopback: {exposed}"
    finally:
        sync.close()


@pytest.mark.vllm
def test_every_weight_route_needs_the_token(vllm_server):
    url = vllm_server.url
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() if p.startswith("/weights") for m in ops]
    assert ("POST", "/weights/prepare") in routes and ("POST", "/weights/load_from_disk") in routes, routes
    version = requests.get(f"{url}/weight_version", timeout=10).json()
    body = {"path": str(vllm_server.model_dir), "version": 999_999, "manifest": {}}
    for method, path in routes:
        r = requests.request(method, url + path, json=body, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        r = requests.request(method, url + path, json=body, timeout=30,
                             headers={"Authorization": "Bearer " + "y" * 43})
        assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
    assert requests.get(f"{url}/weight_version", timeout=10).json() == version, "a refused request changed weights"
    log = vllm_server.handle.process.log_path.read_text(errors="replace")
    for method, path in routes:
        assert f"refused {method} {path} from 127.0.0.1: no token" in log, (method, path)
    # vLLM's own dev-mode routes would bypass the token: they must not exist.
    for path in ("/collective_rpc", "/update_weights", "/init_weight_transfer_engine", "/pause"):
        assert path not in schema["paths"], path
        assert requests.post(url + path, json={}, timeout=10).status_code in (404, 405), path


@pytest.mark.vllm
def test_generate_body_size_is_limited(vllm_server):
    big = b'{"prompt": {"prompt_token_ids": [' + b"1, " * (3 << 20) + b'1]}, "max_tokens": 1}'
    r = requests.post(f"{vllm_server.url}/generate", data=big, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"], (r.status_code, r.text[:200])
    # The server still serves afterwards.
    ok = requests.post(f"{vllm_server.url}/generate", json={"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 1,
                                                            "logprobs": 0}, timeout=60)
    assert ok.status_code == 200, ok.text[:200]


# ---- nothing from the network is unpickled ---------------------------------------------------------

_OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                       "recv_object_list", "send_object_list"}


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal") for n in names):
                found.append(f"{path.name}:{node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        kw = {k.arg: k.value for k in node.keywords}
        if name == "load" and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "torch":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
        if name in _OBJECT_COLLECTIVES:
            found.append(f"{path.name}:{node.lineno}: {name} pickles its payload")
        ap = kw.get("allow_pickle")
        if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
            found.append(f"{path.name}:{node.lineno}: allow_pickle")
    return found


def test_nothing_from_the_network_is_unpickled():
    files = sorted((REPO / "atropos_core").rglob("*.py")) + sorted((REPO / "drivers").rglob("*.py"))
    assert len(files) > 10
    found = [f for p in files for f in _unsafe_calls(p)]
    assert not found, found
    # The scanner itself finds what it looks for.
    probe = REPO / "tests" / "__pycache__" / "_unsafe_probe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("import pickle\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
                     "dist.broadcast_object_list(x)\nnp.load(f, allow_pickle=True)\n")
    try:
        assert len(_unsafe_calls(probe)) == 5
    finally:
        probe.unlink()
