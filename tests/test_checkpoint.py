"""Checkpoints: kill-and-resume equals an uninterrupted run, HF export loads with transformers,
atomic commits, find_latest / prune / resume resolution."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atropos_core import checkpoint as ck
from atropos_core.model import ModelConfig, OptimConfig, build_optimizer, load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "train_tiny_script.py"
CPU = torch.device("cpu")


def _run(*args, expect_kill=False):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    if expect_kill:
        assert p.returncode == -9, f"expected SIGKILL, got {p.returncode}\n{p.stderr[-3000:]}"
    else:
        assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny_tied_model_dir, tmp_path):
    model = str(tiny_tied_model_dir)
    _run("--model", model, "--ckpt", tmp_path / "a", "--steps", 6, "--every", 2, "--out", tmp_path / "a.pt")
    # Killed while committing step 4: the step-4 checkpoint is fully written but never renamed.
    _run("--model", model, "--ckpt", tmp_path / "b", "--steps", 6, "--every", 2, "--out", tmp_path / "never.pt",
         "--kill-at-commit", 4, expect_kill=True)
    assert not (tmp_path / "never.pt").exists()
    assert (tmp_path / "b" / ".tmp-step-00000004").is_dir()
    assert ck.find_latest(tmp_path / "b").name == "step-00000002"
    _run("--model", model, "--ckpt", tmp_path / "b", "--steps", 6, "--every", 2, "--out", tmp_path / "b.pt",
         "--resume")

    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["start"] == 0 and b["start"] == 2 and a["step"] == b["step"] == 6
    assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], rtol=1e-6, atol=1e-7), k
    assert a["optim"].keys() == b["optim"].keys()
    for i, st in a["optim"].items():
        assert float(st["step"]) == float(b["optim"][i]["step"]) == 6.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(st[key], b["optim"][i][key], rtol=1e-6, atol=1e-10), (i, key)
    # keep_last=2 of steps 2, 4, 6; the stale temp dir was replaced by the resumed save of step 4.
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["step-00000004", "step-00000006"], names
    # The saved checkpoints of both runs hold the same step-6 optimizer state (DCP round trip).
    m1, _ = load_model_and_tokenizer(ModelConfig(path=model), CPU)
    o1, s1 = build_optimizer(m1, OptimConfig(lr=5e-3, warmup_steps=2, schedule="cosine", total_steps=6,
                                             min_lr_ratio=0.1))
    info = ck.load_checkpoint(tmp_path / "b" / "step-00000006", m1, o1, s1, restore_rng=False)
    assert info["step"] == 6
    assert s1.get_last_lr() == pytest.approx(a["lr"])
    ordered = [p for g in o1.param_groups for p in g["params"]]  # state_dict() numbering
    for i, p in enumerate(ordered):
        assert torch.allclose(o1.state[p]["exp_avg"], a["optim"][i]["exp_avg"], rtol=1e-6, atol=1e-10)


def _trained_model(model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(model_dir)), CPU)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2))
    with torch.no_grad():  # move away from the initial weights so a stale file would not pass
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, tok, opt, sched


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_hf_export_loads_with_transformers_and_gives_trainer_logits(which, tiny_model_dir, tiny_tied_model_dir,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, opt, sched = _trained_model(tiny_tied_model_dir if which == "tied" else tiny_model_dir)
    path = ck.save_checkpoint(tmp_path, 3, model, opt, sched, tok)
    loaded = AutoModelForCausalLM.from_pretrained(str(path))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (which == "tied")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    t2 = AutoTokenizer.from_pretrained(str(path))
    assert t2("say red :")["input_ids"] == tok("say red :")["input_ids"]


def test_interrupted_write_never_replaces_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    model, tok, opt, sched = _trained_model(tiny_model_dir)
    good = ck.save_checkpoint(tmp_path, 5, model, opt, sched)
    marker_before = (good / "COMPLETE").stat().st_mtime_ns

    def boom(tmp, final):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "_commit", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 5, model, opt, sched)  # same step: must not clobber the good one
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 7, model, opt, sched)
    assert ck.find_latest(tmp_path) == good
    assert (good / "COMPLETE").stat().st_mtime_ns == marker_before
    assert (tmp_path / ".tmp-step-00000007").is_dir()


def test_find_latest_prune_and_resume_resolution(tiny_model_dir, tmp_path):
    model, tok, opt, sched = _trained_model(tiny_model_dir)
    assert ck.find_latest(tmp_path / "missing") is None
    for s in (1, 2, 10):
        ck.save_checkpoint(tmp_path, s, model, opt, sched, keep_last=2)
    (tmp_path / "step-00000099").mkdir()  # incomplete: no COMPLETE marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000010", "step-00000099"]
    assert ck.find_latest(tmp_path).name == "step-00000010"
    assert ck.resolve_resume(ck.CheckpointConfig(dir=str(tmp_path), resume="auto")).name == "step-00000010"
    assert ck.resolve_resume(ck.CheckpointConfig(dir=str(tmp_path))) is None
    with pytest.raises(ValueError, match="checkpoint.resume"):
        ck.resolve_resume(ck.CheckpointConfig(dir=str(tmp_path), resume=str(tmp_path / "step-00000099")))
    with pytest.raises(ValueError, match="checkpoint.every"):
        ck.CheckpointConfig(every=-1)
    with pytest.raises(ValueError, match="checkpoint.dir"):
        ck.CheckpointConfig(resume="auto")
