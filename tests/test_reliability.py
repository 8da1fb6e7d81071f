"""Reliability: the trainer keeps working when parts fail, loses nothing it accepted beyond the batch
in flight, and ends with one clear message when it cannot go on. Every fault goes through the real
parts (the `drivers/train.py` process, `run-api`, our vLLM server, checkpoints on disk); the only
hand-made faults are the kills themselves and deliberately bad data.

What is here (docs/reliability.md has the table, and what other test files already cover):
- `test_driver_survives_faults` (e2e, slow): one chain of five driver runs that share checkpoints
  (two vLLM cold starts in all).
  Run A: the Atropos API is SIGKILLed and restarted mid-run (the trainer re-registers at its own
  step and goes on), then the vLLM server is SIGKILLed (the trainer names it, saves a checkpoint,
  stops its children, exits 1). Run B: `--resume PATH` from A's exit checkpoint, then the driver
  is SIGKILLed the moment a checkpoint directory is being written (the partial write never
  replaces the previous good one; PDEATHSIG stops vLLM). Run C: `--resume` (newest complete
  checkpoint) recomputes B's last step exactly, then non-finite steps are injected: one is
  skipped with weights and optimizer untouched, three in a row stop the run with exit 1.
  Run D: the API the driver started itself is SIGKILLed: named, checkpoint, exit 1. Run E: SIGTERM
  saves a checkpoint and exits 130.
- `test_bad_groups_never_crash_or_poison_training` (api): hypothesis posts malformed groups of every
  kind (one test case per kind, 2 derandomized examples each, each mixing in up to 2 more kinds)
  between good ones through the real `run-api`; the real client, `build_train_batch` and
  `train_step` on the tiny model never crash, drop and count every bad group, train on the good
  ones and never hold a non-finite weight.
- `test_config_mistakes_name_the_field`, `test_cli_mistakes_exit_2_before_anything_starts` (fast):
  config and CLI mistakes end with exit 2 and one message naming the field, before any child
  process is started (a missing model directory, a taken port, an environment without inference).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch

from atropos_core.checkpoint import find_latest
from atropos_core.procs import ManagedProcess, free_port
from tests.fixtures.atropos_api import ApiServer, make_group, post_groups
from tests.fixtures.processes import (TRAIN, assert_nothing_left, assert_tree_listens_on_loopback_only,
                                      processes_mentioning, read_metrics)

VOCAB = 50          # token ids the test groups use (the tiny model's vocabulary is larger)
BATCH, GROUP = 8, 4  # sequences per batch, per group: two groups make one step


# ---- helpers -----------------------------------------------------------------------------------

def step_groups(step: int, huge_advantages: bool = False) -> list[dict]:
    """The two groups the test posts for `step`: the same step number always gives the same data,
    so a resumed run can be fed exactly the batch the killed run trained on.

    `huge_advantages` injects a non-finite step through the real parts: token advantages of 1e30
    are finite (the API and the batch checks accept them, as they must: a large advantage is not
    malformed), but the gradient they scale overflows fp32 and the global grad norm is inf."""
    rng = random.Random(1000 + step)
    groups = [make_group(rng, n=GROUP, vocab=VOCAB, token_advantages=huge_advantages) for _ in range(2)]
    if huge_advantages:
        for g in groups:
            g["advantages"] = [[0.0 if m == -100 else 1e30 for m in masks] for masks in g["masks"]]
    return groups


def wait_until(pred, timeout: float, what: str, proc: ManagedProcess | None = None, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise AssertionError(f"driver exited ({proc.proc.returncode}) while waiting for {what}:\n"
                                 f"{proc.log_tail(60)}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" +
                         (f":\n{proc.log_tail(60)}" if proc else ""))


def rows_of(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (OSError, json.JSONDecodeError):  # not written yet, or a line being written
        return []


def wait_step(run_dir: Path, step: int, proc: ManagedProcess, skip_rows: int = 0, timeout: float = 120) -> dict:
    def find():
        return next((r for r in rows_of(run_dir)[skip_rows:] if r["step"] == step), None)
    return wait_until(find, timeout, f"step {step} in {run_dir}/metrics.jsonl", proc)


def api_json(url: str, path: str) -> dict:
    return requests.get(url + path, timeout=10).json()


def registered(url: str) -> bool:
    try:
        return api_json(url, "/info")["batch_size"] == BATCH
    except (requests.RequestException, ValueError):
        return False


def kill_group(pid: int) -> None:
    """SIGKILL a process and everything in its process group (a crash: no clean-up code runs)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def vllm_server_pid(port: int) -> int:
    """PID of the vLLM API server process (leader of its process group) listening on `port`."""
    for line in processes_mentioning(f"--port {port}"):
        pid = int(line.split(":", 1)[0])
        if "atropos_core.inference.server" in line and os.getpgid(pid) == pid:
            return pid
    raise AssertionError(f"no vLLM server process for port {port}: {processes_mentioning(str(port))}")


def start_driver(run_dir: Path, log: Path, model_dir, api_url: str, *extra: str) -> ManagedProcess:
    return ManagedProcess("driver", TRAIN + [
        "--model", str(model_dir), "--atropos-url", api_url, "--out", str(run_dir), "--steps", "40",
        "--atropos.batch_size", str(BATCH), "--atropos.group_size", str(GROUP), "--atropos.max_token_len", "64",
        "--data.max_token_len", "64", "--optim.lr", "1e-3", "--checkpoint.keep_last", "0", *extra], log).start()


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def scheduler_steps(ckpt: Path) -> int:
    return torch.load(ckpt / "trainer_state.pt", weights_only=True)["scheduler"]["last_epoch"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- the driver under faults -------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_driver_survives_faults(tmp_path, tiny_model_dir):

    api = ApiServer(tmp_path / "api_logs").start()
    drivers: list[ManagedProcess] = []
    try:
        # ---- Run A: API killed and restarted, then the vLLM server dies --------------------------
        run_a, port_a = tmp_path / "run_a", free_port()
        a = start_driver(run_a, tmp_path / "driver_a.log", tiny_model_dir, api.url, "--inference-port", str(port_a),
                         "--checkpoint.every", "2")
        drivers.append(a)
        wait_until(lambda: registered(api.url), 400, "the driver to register (after vLLM's cold start)", a)
        for s in (1, 2):
            post_groups(api.url, step_groups(s))
            wait_step(run_a, s, a)
        # While the run is live: the driver (its weight-sync store) and the vLLM server it started (with
        # its engine processes) listen on loopback only.
        socks = assert_tree_listens_on_loopback_only(a.pid)
        assert any(port == port_a for _, _, port in socks)

        kill_group(api.proc.pid)          # the API crashes (SIGKILL: its state is gone)...
        api.proc.proc.wait(timeout=10)
        time.sleep(2)                     # ...the trainer meets connection errors meanwhile...
        api.start()                       # ...and it comes back, empty, on the same port
        wait_until(lambda: registered(api.url), 60, "the driver to re-register with the restarted API", a)
        assert api_json(api.url, "/status")["current_step"] == 2, "re-registered at another step than the trainer's"
        post_groups(api.url, step_groups(3))
        row3 = wait_step(run_a, 3, a)
        assert row3["data/reregistered"] >= 1 and row3["data/connection_errors"] >= 1, row3
        assert row3["sync/server_version"] == 3
        assert a.alive()

        kill_group(vllm_server_pid(port_a))  # the vLLM server crashes while the trainer waits for data
        rc = a.proc.wait(timeout=120)
        log_a = (tmp_path / "driver_a.log").read_text()
        assert rc == 1, log_a[-4000:]
        assert f"vLLM server http://127.0.0.1:{port_a}" in log_a and "exited with code -9" in log_a, log_a[-4000:]
        assert "stopped at step 3 (exit 1)" in log_a
        # checkpoint.every is 2: step 3's checkpoint is the one saved on the way out.
        assert find_latest(run_a / "checkpoints") == run_a / "checkpoints" / "step-00000003"
        assert [r["step"] for r in read_metrics(run_a)] == [1, 2, 3]
        assert_nothing_left(run_a, [port_a])

        # ---- Run B: resume from A's exit checkpoint; SIGKILL while a checkpoint is being written --
        api.restart()
        run_b, port_b = tmp_path / "run_b", free_port()
        b = start_driver(run_b, tmp_path / "driver_b.log", tiny_model_dir, api.url, "--inference-port", str(port_b),
                         "--checkpoint.every", "1", "--resume", str(run_a / "checkpoints" / "step-00000003"))
        drivers.append(b)
        wait_until(lambda: registered(api.url), 400, "run B to register", b)
        assert api_json(api.url, "/status")["current_step"] == 3, "run B did not register at its resumed step"
        post_groups(api.url, step_groups(4))
        row4 = wait_step(run_b, 4, b)
        assert row4["sync/server_version"] == 4
        ckpts_b = run_b / "checkpoints"
        wait_until(lambda: (ckpts_b / "step-00000004" / "COMPLETE").exists(), 60, "step 4's checkpoint", b)
        post_groups(api.url, step_groups(5))
        partial = ckpts_b / ".tmp-step-00000005"
        wait_until(lambda: partial.exists(), 120, "step 5's checkpoint write to begin", b, every=0.001)
        kill_group(b.pid)  # the driver is its group's leader: SIGKILL to it alone (children are not in it)
        assert b.proc.wait(timeout=30) == -signal.SIGKILL
        killed_mid_write = partial.exists()
        latest_b = find_latest(ckpts_b)
        if killed_mid_write:
            assert latest_b == ckpts_b / "step-00000004", "a partial checkpoint replaced the good one"
        else:  # the write finished between seeing .tmp and the kill: it must then be complete
            assert latest_b == ckpts_b / "step-00000005"
        assert all((p / "COMPLETE").exists() for p in ckpts_b.glob("step-*")), list(ckpts_b.iterdir())
        # The driver ran no clean-up code, yet PDEATHSIG stopped the vLLM server it had started.
        assert_nothing_left(run_b, [port_b])
        rows_b = read_metrics(run_b)
        assert [r["step"] for r in rows_b] == [4, 5]

        # ---- Run C: `--resume` picks the newest complete checkpoint; non-finite steps ----------------
        api.restart()
        resumed = int(latest_b.name.split("-")[1])
        c = start_driver(run_b, tmp_path / "driver_c.log", tiny_model_dir, api.url, "--no-inference",
                         "--checkpoint.every", "1", "--resume")
        drivers.append(c)
        wait_until(lambda: registered(api.url), 120, "run C to register", c)
        assert api_json(api.url, "/status")["current_step"] == resumed
        assert f"resumed from {latest_b} at step {resumed}" in (tmp_path / "driver_c.log").read_text()
        first = resumed + 1
        post_groups(api.url, step_groups(first))
        row = wait_step(run_b, first, c, skip_rows=len(rows_b))
        if killed_mid_write:  # B trained this very batch from the same checkpoint: same numbers
            before = rows_b[-1]
            for k in ("loss/total", "grad/norm", "lr", "entropy/mean"):
                assert row[k] == pytest.approx(before[k], rel=1e-5, abs=1e-7), (k, row[k], before[k])

        ck = lambda s: run_b / "checkpoints" / f"step-{s:08d}"  # noqa: E731
        # One non-finite step: skipped, logged, counted; then training goes on.
        post_groups(api.url, step_groups(first + 1, huge_advantages=True))
        bad = wait_step(run_b, first + 1, c, skip_rows=len(rows_b))
        assert bad["train/skipped_nonfinite"] == 1.0 and not math.isfinite(float(bad["grad/norm"])), bad
        wait_until(lambda: (ck(first + 1) / "COMPLETE").exists(), 60, "the skipped step's checkpoint", c)
        assert same_weights(ck(first), ck(first + 1)), "a skipped step changed the weights"
        assert scheduler_steps(ck(first)) == scheduler_steps(ck(first + 1)), "a skipped step moved the schedule"
        post_groups(api.url, step_groups(first + 2))
        good = wait_step(run_b, first + 2, c, skip_rows=len(rows_b))
        assert good["train/skipped_nonfinite"] == 0.0 and math.isfinite(float(good["loss/total"]))
        # Three in a row (run.max_nonfinite_steps=3): the run stops with a clear message (the third
        # is not logged as a step: the run ends there, saving its untouched weights).
        for s in range(first + 3, first + 6):
            post_groups(api.url, step_groups(s, huge_advantages=True))
            if s < first + 5:
                assert wait_step(run_b, s, c, skip_rows=len(rows_b))["train/skipped_nonfinite"] == 1.0
        rc = c.proc.wait(timeout=120)
        log_c = (tmp_path / "driver_c.log").read_text()
        assert rc == 1, log_c[-4000:]
        assert "3 consecutive steps had a non-finite loss or gradient (run.max_nonfinite_steps=3)" in log_c
        last = find_latest(run_b / "checkpoints")
        assert last == ck(first + 5)
        assert same_weights(ck(first + 2), last) and not same_weights(ck(first + 1), ck(first + 2))
        assert all(torch.isfinite(t).all() for t in weights(last).values())

        # ---- Run D: the API the driver started itself dies: named, checkpoint, exit 1 -----------------
        run_d, step_d = tmp_path / "run_d", first + 6
        d = ManagedProcess("driver", TRAIN + [
            "--model", str(tiny_model_dir), "--no-inference", "--no-env", "--out", str(run_d), "--steps", "40",
            "--atropos.batch_size", str(BATCH), "--atropos.max_token_len", "64", "--data.max_token_len", "64",
            "--resume", str(last)], tmp_path / "driver_d.log").start()
        drivers.append(d)
        own_url = wait_until(lambda: (run_d / "config.json").exists() and
                             json.loads((run_d / "config.json").read_text())["atropos"]["url"], 120, "config.json", d)
        wait_until(lambda: registered(own_url), 120, "run D to register with its own API", d)
        post_groups(own_url, step_groups(step_d))
        wait_step(run_d, step_d, d)
        own_port = int(own_url.rsplit(":", 1)[1])
        api_pid = next(int(ln.split(":", 1)[0]) for ln in processes_mentioning(f"--port {own_port}") if "run_api" in ln)
        kill_group(api_pid)
        assert d.proc.wait(timeout=60) == 1
        log_d = (tmp_path / "driver_d.log").read_text()
        assert f"Atropos API (pid {api_pid}) exited with code -9" in log_d, log_d[-3000:]
        assert find_latest(run_d / "checkpoints") == run_d / "checkpoints" / f"step-{step_d:08d}"

        # ---- Run E: SIGTERM (like Ctrl-C) saves a checkpoint and exits 130 ---------------------------
        api.restart()
        run_e = tmp_path / "run_e"
        e = start_driver(run_e, tmp_path / "driver_e.log", tiny_model_dir, api.url, "--no-inference",
                         "--resume", str(run_d / "checkpoints" / f"step-{step_d:08d}"))
        drivers.append(e)
        wait_until(lambda: registered(api.url), 120, "run E to register", e)
        post_groups(api.url, step_groups(step_d + 1))
        wait_step(run_e, step_d + 1, e)
        e.proc.send_signal(signal.SIGTERM)
        assert e.proc.wait(timeout=60) == 130
        assert f"interrupted at step {step_d + 1}" in (tmp_path / "driver_e.log").read_text()
        # checkpoint.every is 0 here: this checkpoint is the one saved on the way out.
        assert find_latest(run_e / "checkpoints") == run_e / "checkpoints" / f"step-{step_d + 1:08d}"
    finally:
        for d in drivers:
            d.stop()
        api.stop()


# ---- malformed groups through the real API: hypothesis ---------------------------------------------

MAX_LEN = 64


def _good(rng: random.Random, tag: str) -> dict:
    g = make_group(rng, n=GROUP, vocab=VOCAB)
    g["generation_params"] = {"tag": tag}
    return g


def _per_token_fields(g: dict) -> list[str]:
    return [f for f in ("masks", "inference_logprobs", "ref_logprobs") if g.get(f) is not None]


# Each mutation turns a good group into one the trainer must drop (`bad`), one the API itself must
# refuse (`refused`: pydantic types), or a valid but extreme one (`wild`). All have 4 or 8 token rows
# so the API can ship them: a group of a size that cannot fill a batch with the others waits forever
# (an API limit; a group larger than the batch is refused by AtroposConfig at start-up).
def _mutate(g: dict, kind: str, draw, st) -> str:
    i = draw(st.integers(0, GROUP - 1))
    if kind == "count":
        field = draw(st.sampled_from(["masks", "scores", "inference_logprobs", "ref_logprobs"]))
        if draw(st.booleans()):
            g[field].pop(i)
        else:
            g[field].append(copy.deepcopy(g[field][i]))
        return "bad"
    if kind == "length":
        field = draw(st.sampled_from(_per_token_fields(g)))
        g[field][i] = g[field][i][:-1] if draw(st.booleans()) else g[field][i] + g[field][i][-1:]
        return "bad"
    if kind == "token_id":
        j = draw(st.integers(0, len(g["tokens"][i]) - 1))
        g["tokens"][i][j] = draw(st.sampled_from([-1, -(2**40), 10**6, 2**31, 2**63 - 1]))
        return "bad"
    if kind == "mask":
        g["masks"][i][-1] = g["tokens"][i][-1] + draw(st.integers(1, 5))
        return "bad"
    if kind == "no_trained":
        g["masks"] = [[-100] * len(t) for t in g["tokens"]]
        return "bad"
    if kind == "empty":
        rows = range(GROUP) if draw(st.booleans()) else [i]
        for r in rows:
            for f in ["tokens"] + _per_token_fields(g):
                g[f][r] = []
        return "bad"
    if kind == "too_long":
        extra = draw(st.integers(MAX_LEN, 5000))
        g["tokens"][i] = g["tokens"][i] + [7] * extra
        g["masks"][i] = g["masks"][i] + [7] * extra
        for f in ("inference_logprobs", "ref_logprobs"):
            g[f][i] = g[f][i] + [-1.0] * extra
        return "bad"
    if kind == "positive_logprob":
        field = draw(st.sampled_from(["inference_logprobs", "ref_logprobs"]))
        g[field][i][-1] = draw(st.floats(0.01, 1e6))
        return "bad"
    if kind == "size":  # twice the group size (the API ships it alone as one batch), counts disagreeing
        big = make_group(random.Random(draw(st.integers(0, 999))), n=2 * GROUP, vocab=VOCAB)
        big["generation_params"] = g["generation_params"]
        field = draw(st.sampled_from(["masks", "scores", "inference_logprobs", "ref_logprobs"]))
        big[field] = big[field][:GROUP]
        g.clear()
        g.update(big)
        return "bad"
    if kind == "non_finite":  # the API accepts it; its /batch then answers 500 and loses the batch
        field = draw(st.sampled_from(["scores", "inference_logprobs", "ref_logprobs"]))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if field == "scores":
            g["scores"][i] = value
        else:
            g[field][i][-1] = value
        return "non_finite"
    if kind == "types":
        where = draw(st.sampled_from(["token", "row", "scores", "masks", "missing"]))
        junk = draw(st.sampled_from(["x", 1.5, None, [1], {"a": 1}]))
        if where == "token":
            g["tokens"][i][0] = junk
        elif where == "row":
            g["tokens"][i] = "tokens"
        elif where == "scores":
            g["scores"][i] = "high" if junk is None or isinstance(junk, float) else junk
        elif where == "masks":
            g["masks"] = {"0": g["masks"][0]}
        else:
            del g[draw(st.sampled_from(["tokens", "masks", "scores"]))]
        return "refused"
    if kind == "huge_advantages":  # finite, so valid: the gradient overflows fp32 (step skipped), never a weight
        mag = draw(st.sampled_from([1e30, 1e38]))
        g["advantages"] = [[0.0 if m == -100 else mag * draw(st.sampled_from([-1.0, 1.0])) for m in row]
                           for row in g["masks"]]
        return "wild"
    if kind == "huge_scores":  # finite and valid; the group's std overflows to inf: advantages 0
        g["scores"][i] = draw(st.sampled_from([1e300, -1e300, 1e-300]))
        return "wild"
    raise AssertionError(kind)


KINDS = ["count", "length", "token_id", "mask", "no_trained", "empty", "too_long", "positive_logprob", "size",
         "non_finite", "types", "huge_advantages", "huge_scores"]


def _post_one(url: str, group: dict) -> int:
    body = json.dumps([group], allow_nan=True)
    return requests.post(url + "/scored_data_list", data=body, headers={"Content-Type": "application/json"},
                         timeout=60).status_code


@pytest.fixture(scope="module")
def trainer_parts(tiny_model_dir):
    """One tiny model and optimizer trained on by every example of the bad-input test, in turn."""
    from atropos_core.data import DataConfig
    from atropos_core.model import ModelConfig, OptimConfig, build_optimizer, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-3, grad_clip=1.0))
    vocab = model.get_input_embeddings().weight.shape[0]
    return model, optimizer, scheduler, DataConfig(max_token_len=MAX_LEN, vocab_size=vocab)


# What each kind must make happen at least once over its examples (besides good groups training).
KIND_SHOWS = {"types": "refused", "non_finite": "lost_batches", "huge_advantages": "skipped_steps",
              "huge_scores": "trained_steps"}


@pytest.mark.api
@pytest.mark.parametrize("kind", KINDS)
def test_bad_groups_never_crash_or_poison_training(kind, atropos_api_server, trainer_parts):
    """2 hypothesis examples per kind (26 in all): the kind itself plus up to 2 more drawn freely,
    between good groups; derandomized, so CI runs the same examples every time."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from atropos_core.data import build_train_batch
    from atropos_core.client import AtroposClient, AtroposConfig
    from atropos_core.loss import LossConfig
    from atropos_core.trainer import train_step

    model, optimizer, scheduler, data_cfg = trainer_parts
    totals = {"trained_steps": 0, "skipped_steps": 0, "dropped": 0, "refused": 0, "lost_batches": 0}

    @settings(max_examples=2, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(more=st.lists(st.sampled_from(KINDS), max_size=2), seed=st.integers(0, 2**16), data=st.data())
    def check(more, seed, data):
        kinds = [kind] + more
        api = atropos_api_server
        if api.proc is None or not api.proc.alive():
            api.start()
        api.reset()
        client = AtroposClient(AtroposConfig(url=api.url, batch_size=BATCH, max_token_len=MAX_LEN, max_wait_s=20))
        client.register()
        rng = random.Random(seed)
        expect: dict[str, str] = {}      # tag -> "good" | "bad" | "wild" | "non_finite" of groups the API took
        rows = 0                          # sequences the API took
        posted = [_good(rng, "good-0")]
        for k, what in enumerate(kinds):
            g = _good(rng, f"m{k}-{what}")
            outcome = _mutate(g, what, data.draw, st)
            posted += [(g, outcome), _good(rng, f"good-{k + 1}")]
        for item in posted:
            g, outcome = item if isinstance(item, tuple) else (item, "good")
            status = _post_one(api.url, g)
            if outcome == "refused":
                assert status == 422, (status, g)  # pydantic at the API: never reaches the trainer
                totals["refused"] += 1
            else:
                assert status == 200, (status, outcome)
                expect[g["generation_params"]["tag"]] = outcome
                rows += len(g["tokens"])
        if rows % BATCH:  # groups have 4 or 8 rows: one more good group makes whole batches
            filler = _good(rng, "good-filler")
            assert _post_one(api.url, filler) == 200
            expect["good-filler"] = "good"

        seen: list[str] = []
        api_errors_before = client.metrics()["data/api_errors"]
        for _ in range(40):
            groups = client.get_batch()
            if not groups:
                if requests.get(api.url + "/status", timeout=10).json()["queue_size"] == 0:
                    break
                continue
            tags = [grp["generation_params"]["tag"] for grp in groups]
            seen += tags
            batch = build_train_batch(groups, data_cfg)
            n_bad = sum(expect[t] == "bad" for t in tags)
            assert batch.metrics["data/dropped"] == n_bad, (tags, batch.metrics)
            assert batch.num_groups == len(tags) - n_bad
            totals["dropped"] += n_bad
            if batch.total_trained_tokens == 0:
                continue
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            m = train_step(model, optimizer, scheduler, batch.micro_batches, LossConfig(loss_type="grpo"),
                           global_normalizer=batch.total_trained_tokens, grad_clip=1.0)
            if m["train/skipped_nonfinite"]:
                totals["skipped_steps"] += 1
                assert any(expect[t] == "wild" for t in tags), ("a batch without extreme values was skipped", tags)
                assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "skipped step moved weights"
            else:
                totals["trained_steps"] += 1
            assert all(torch.isfinite(p).all() for p in model.parameters()), "a non-finite weight"
        lost = client.metrics()["data/api_errors"] - api_errors_before
        totals["lost_batches"] += lost
        assert all(expect[t] != "non_finite" for t in seen), "a NaN group reached the trainer"
        if "non_finite" in expect.values():
            assert lost >= 1, "the API served a NaN batch without an error?"
        else:  # nothing lost: every group the API took reached the trainer exactly once
            assert sorted(seen) == sorted(expect), (seen, expect)
        client.close()

    check()
    assert totals["trained_steps"] > 0, totals
    assert totals[KIND_SHOWS.get(kind, "dropped")] > 0, totals


# ---- config and CLI mistakes: exit 2 at start-up, before any child process -------------------------

@pytest.mark.parametrize("args, names", [
    (["--env.group_size", "16", "--atropos.batch_size", "8"], "atropos.group_size 16 > atropos.batch_size 8"),
    (["--atropos.batch_size", "12", "--atropos.group_size", "8"], "atropos.batch_size 12 is not a multiple"),
    (["--data.max_token_len", "1"], "data.max_token_len must be >= 2"),
    (["--steps", "0"], "run.steps must be >= 1"),
    (["--steps", "many"], "run.steps: cannot parse 'many'"),
    (["--optim.lrr", "1e-3"], "did you mean 'optim.lr'"),
    (["--inference.port", "70000"], "inference.port must be in [0, 65535]"),
])
def test_config_mistakes_name_the_field(args, names, tiny_model_dir):
    from atropos_core.config import ConfigError, parse_args

    with pytest.raises(ConfigError) as err:
        parse_args(["--model", str(tiny_model_dir)] + args)
    assert names in str(err.value)


def _run_driver_expecting_config_error(tmp_path, args) -> str:
    """Run the driver; it must exit 2 with one `config error` line and start nothing."""
    run_dir = tmp_path / "run"
    p = subprocess.run(TRAIN + ["--out", str(run_dir)] + args, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    errors = [ln for ln in p.stderr.splitlines() if "config error" in ln]
    assert len(errors) == 1, p.stderr[-3000:]
    # Nothing was started: every child writes its log under <run>/logs, and none runs now.
    assert not (run_dir / "logs").exists(), list((run_dir / "logs").iterdir())
    assert not processes_mentioning(str(run_dir))
    return errors[0]


def test_cli_mistakes_exit_2_before_anything_starts(tmp_path, tiny_model_dir):
    # Caught while parsing.
    line = _run_driver_expecting_config_error(tmp_path, ["--model", str(tiny_model_dir), "--env.group_size", "16",
                                                         "--atropos.batch_size", "8"])
    assert "atropos.group_size 16 > atropos.batch_size 8" in line
    # Caught while launching, before the first child: a missing model directory...
    line = _run_driver_expecting_config_error(tmp_path, ["--model", str(tmp_path / "no_such_model")])
    assert "model.path" in line and "no_such_model" in line
    # ...an environment to start without an inference server for it...
    line = _run_driver_expecting_config_error(tmp_path, ["--model", str(tiny_model_dir), "--no-inference"])
    assert "env.start needs an inference server" in line
    # ...and an inference port that something else holds.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _run_driver_expecting_config_error(tmp_path, ["--model", str(tiny_model_dir), "--inference-port",
                                                             str(port)])
    assert f"inference.port {port} is already in use" in line
