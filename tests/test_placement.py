"""GPU placement of trainer ranks and vLLM servers (`atropos_core.placement`), on the facts a GPU node
presents (visible devices, LOCAL_WORLD_SIZE, tensor-parallel size): pure logic, no GPU needed."""
from __future__ import annotations

import logging

import pytest

from atropos_core.config import ConfigError, InferenceConfig, TrainConfig
from atropos_core.placement import (PlacementError, parse_gpu_list, plan_placement, tensor_parallel_size,
                                    visible_gpus)

EIGHT = [str(i) for i in range(8)]


def test_auto_gives_servers_their_own_gpus():
    p = plan_placement(EIGHT, trainer_ranks=4, num_servers=4)
    assert p.trainer == ["0", "1", "2", "3"]
    assert p.servers == [["4"], ["5"], ["6"], ["7"]] and p.colocated == [False] * 4
    assert p.env(2) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert p.extra_args(0, []) == []                       # the whole GPU: vLLM's default share
    tp = plan_placement(EIGHT, trainer_ranks=4, num_servers=2, gpus_per_server=2)
    assert tp.servers == [["4", "5"], ["6", "7"]] and not any(tp.colocated)


def test_auto_colocates_when_no_gpu_is_free_and_says_so(caplog):
    from atropos_core.placement import log_placement

    p = plan_placement(["0"], trainer_ranks=1, num_servers=1)
    assert p.servers == [["0"]] and p.colocated == [True] and "need 1" in p.reason
    assert p.extra_args(0, []) == ["--gpu-memory-utilization", "0.3"]
    assert p.extra_args(0, ["--gpu-memory-utilization", "0.5"]) == []
    with caplog.at_level(logging.INFO, logger="atropos_core.placement"):
        log_placement(p)
    assert "colocated" in caplog.text and "gloo" in caplog.text
    full = plan_placement(EIGHT, trainer_ranks=8, num_servers=2)
    assert full.servers == [["0"], ["1"]] and full.colocated == [True, True]


def test_explicit_and_colocate_modes():
    p = plan_placement(["0", "1"], trainer_ranks=2, num_servers=2, requested="4-5")
    assert p.servers == [["4"], ["5"]] and not any(p.colocated)  # GPUs hidden from the trainer are fine
    c = plan_placement(["0", "1"], trainer_ranks=2, num_servers=1, requested="colocate")
    assert c.servers == [["0"]] and c.colocated == [True]
    shared = plan_placement(["0", "1", "2"], trainer_ranks=1, num_servers=2, requested="1,1")
    assert shared.colocated == [True, True]                 # two servers on one GPU: flagged too
    with pytest.raises(PlacementError, match="need 4"):
        plan_placement(EIGHT, trainer_ranks=4, num_servers=2, gpus_per_server=2, requested="4,5,6")
    with pytest.raises(PlacementError, match="distinct"):
        plan_placement(["0"], trainer_ranks=1, num_servers=1, gpus_per_server=2)
    with pytest.raises(PlacementError, match="visible"):
        plan_placement(["0", "1"], trainer_ranks=4, num_servers=1)


def test_parsing_helpers():
    assert parse_gpu_list("4-7") == ["4", "5", "6", "7"]
    assert parse_gpu_list("0, 2-3") == ["0", "2", "3"]
    assert parse_gpu_list("GPU-8f3a-11") == ["GPU-8f3a-11"]
    for bad in ("a", "7-4", "1;2"):
        with pytest.raises(PlacementError):
            parse_gpu_list(bad)
    assert tensor_parallel_size(["--tensor-parallel-size", "2"]) == 2
    assert tensor_parallel_size(["-tp=4", "--x"]) == 4 and tensor_parallel_size([]) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({}, count=2) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_config_validates_and_launch_builds_per_server_env(monkeypatch):
    from atropos_core.services import _place_servers

    with pytest.raises(ValueError, match="inference.gpus"):
        InferenceConfig(gpus="four")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = TrainConfig(inference=InferenceConfig(num_servers=2))
    envs, args = _place_servers(cfg, [])
    assert envs == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"}] and args == [[], []]
    cfg = TrainConfig(inference=InferenceConfig(num_servers=2, gpus="5"))
    with pytest.raises(ConfigError, match="need 2"):
        _place_servers(cfg, [])
