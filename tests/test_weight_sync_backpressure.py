"""NCCL back-pressure of the weight transfer (issue #15, item 4), on what CPU can run: the host-side
per-message wait (`weight_sync.transport.wait_done`) on a real two-rank gloo group, a fault double for a message
that never completes, and the CleanUpOnly error handling of the NCCL group (a double of the NCCL class
records the environment its constructor sees; this torch build has no NCCL)."""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from atropos_core.weight_sync import protocol, transport


def _gloo_pair():
    store = dist.HashStore()
    groups = [None, None]

    def make(rank):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=20)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, opts)
    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return groups


def test_host_poll_wait_receives_in_order_on_a_real_group():
    """Receiver posts depth=2 messages ahead and waits with host polling: every message arrives intact."""
    g0, g1 = _gloo_pair()
    msgs = [torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate((5, 1000, 3, 70000))]
    got = []

    def receiver():
        inflight = []
        for m in msgs:
            buf = torch.empty_like(m)
            inflight.append((buf, transport.broadcast_async(g1, buf)))
            if len(inflight) >= 2:
                b, w = inflight.pop(0)
                transport.wait_done(w, 10.0, host_poll=True)
                got.append(b)
        for b, w in inflight:
            transport.wait_done(w, 10.0, host_poll=True)
            got.append(b)
    t = threading.Thread(target=receiver)
    t.start()
    for m in msgs:
        transport.wait_done(transport.broadcast_async(g0, m.clone()), 10.0, host_poll=True)
    t.join(30)
    assert len(got) == len(msgs) and all(torch.equal(a, b) for a, b in zip(got, msgs))


class _NeverDone:
    """Fault double: a transfer whose peer never sends (a hung NCCL collective)."""

    waited = False

    def is_completed(self):
        return False

    def wait(self, *a):
        _NeverDone.waited = True  # would chain the stream to a hung op: must not be reached
        raise AssertionError("wait() reached on a hung transfer")


def test_hung_message_raises_after_its_own_timeout():
    t0 = time.monotonic()
    with pytest.raises(protocol.WeightSyncError, match="per-message timeout"):
        transport.wait_done(_NeverDone(), 0.3, host_poll=True, what="message with 'lm_head.weight'")
    assert 0.3 <= time.monotonic() - t0 < 5 and not _NeverDone.waited


def test_message_timeout_is_sized_per_message():
    assert protocol.message_timeout(30.0, 0) == 30.0
    assert protocol.message_timeout(30.0, 2 * 10**9) == pytest.approx(32.0)


def test_nccl_group_is_built_with_cleanup_only_error_handling(monkeypatch):
    seen = {}

    class FakeNCCL:  # stands in for ProcessGroupNCCL (absent from the CPU build)
        def __init__(self, store, rank, world, opts):
            seen["env"] = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    transport._nccl_group_without_teardown(FakeNCCL, None, 0, 2, None)
    assert seen["env"] == "2" and os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    transport._nccl_group_without_teardown(FakeNCCL, None, 0, 2, None)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
