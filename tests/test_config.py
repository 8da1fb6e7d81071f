"""The run's config and CLI: --help from the field docstrings, declarative checks, derived fields."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest

from atropos_core import config as C
from atropos_core.checks import Between, Ge, check_fields
from atropos_core.model import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def test_help_shows_every_settable_field_with_its_docstring_and_default():
    r = subprocess.run([sys.executable, str(REPO / "drivers" / "train.py"), "--help"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = " ".join(r.stdout.split())  # argparse wraps lines
    assert "--optim.lr FLOAT Peak learning rate. (default: 1e-06)" in out
    assert "--run.device {auto,cpu,cuda}" in out and "--resume [PATH]" in out
    assert " ".join(C.field_docs(OptimConfig)["warmup_steps"].split()) in out
    for sec, cls in C._sections().items():
        for name in C.field_docs(cls):
            key = f"{sec}.{name}"
            assert (f"--{key} " in out) == (key not in C.DERIVED), key   # derived ones are not settings
    assert "(default: <run.out>/checkpoints)" in out


def test_spellings_of_today_keep_working(tmp_path):
    (tmp_path / "c.toml").write_text('[optim]\nlr = 5e-4\nwarmup_steps = 3\n[env]\nmodules = ["a.env", "b.env"]\n')
    cfg = C.parse_args(["--model", "m", "--config", str(tmp_path / "c.toml"), "--optim.lr=3e-4",
                        "--loss.loss_type", "grpo", "--resume", "--no-env", "--inference.start", "false",
                        "--checkpoint.keep_last", "2", "--max-token-len", "none",
                        "--inference.extra_args", "--dtype=bfloat16"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.env.modules) == (3e-4, 3, ["a.env", "b.env"])  # CLI after file
    assert (cfg.loss.loss_type, cfg.checkpoint.resume, cfg.env.start, cfg.inference.start) == ("grpo", "auto",
                                                                                                 False, False)
    assert cfg.run.max_token_len is None and cfg.inference.extra_args == "--dtype=bfloat16"
    assert C.parse_args(["--model", "m", "--resume", "/ckpt/step-3"]).checkpoint.resume == "/ckpt/step-3"
    (tmp_path / "c.json").write_text(json.dumps({"run": {"seed": 4}, "checkpoint": {"resume": "none"}}))
    cfg = C.parse_args(["--model", "m", "--config", str(tmp_path / "c.json")])
    assert cfg.run.seed == 4 and cfg.checkpoint.resume is None


@pytest.mark.parametrize("argv, message", [
    (["--optim.lrr", "1e-3"], "unknown field 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["--optimm.lr", "1e-3"], "unknown config section 'optimm' (did you mean 'optim'?)"),
    (["--run.device", "tpu"], "run.device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
    (["--model.gradient_checkpointing", "maybe"], "model.gradient_checkpointing: cannot parse 'maybe' as bool"),
    (["--inference.num_servers", "0"], "inference.num_servers must be >= 1, got 0"),
    (["--env.group_size", "1"], "env.group_size must be >= 2, got 1"),
    (["--optim.total_steps", "5"], "optim.total_steps is not a setting: it follows run.steps"),
    (["--atropos.num_steps", "5"], "atropos.num_steps is not a setting: it follows run.steps"),
    (["--data.vocab_size", "5"], "data.vocab_size is not a setting"),
    (["--env.group_size", "4", "--atropos.group_size", "8"], "env.group_size=4, atropos.group_size=8"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_a_mistake_is_one_config_error_naming_it(argv, message):
    with pytest.raises(C.ConfigError) as e:
        C.parse_args(["--model", "m", *argv])
    assert message in str(e.value)


def test_derived_fields_agree_with_their_one_setting():
    for argv in ([], ["--model", "m"], ["--model", "m", "--steps", "7", "--max-token-len", "300"],
                 ["--model", "m", "--atropos.group_size", "4", "--atropos.batch_size", "16"],
                 ["--model", "m", "--no-env", "--env.group_size", "4", "--atropos.batch_size", "12"]):
        cfg = C.parse_args(argv)
        assert cfg.optim.total_steps == cfg.atropos.num_steps == cfg.run.steps, argv
        assert cfg.atropos.group_size == cfg.env.group_size, argv
        if cfg.run.max_token_len is not None:
            assert cfg.data.max_token_len == cfg.atropos.max_token_len == cfg.run.max_token_len, argv
    # Environments run by someone else: the group size is checked only when given.
    assert C.parse_args(["--model", "m", "--no-env", "--atropos.batch_size", "12"]).atropos.group_size is None
    # Replacing the run section keeps them agreeing (what the launcher does with the model's length).
    import dataclasses
    cfg = C.parse_args(["--model", "m"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=9, max_token_len=128))
    assert (cfg.optim.total_steps, cfg.atropos.num_steps, cfg.data.max_token_len, cfg.atropos.max_token_len) == (
        9, 9, 128, 128)


def test_declared_checks_name_section_and_field():
    from dataclasses import dataclass

    @dataclass
    class Probe:
        n: Annotated[int, Ge(1)] = 1
        port: Annotated[int, Between(0, 9)] = 0
        mode: Literal["a", "b"] = "a"
        cap: Optional[Annotated[float, Ge(0.5)]] = None

    check_fields(Probe(cap=0.5), "probe")
    for kwargs, message in ((dict(n=0), "probe.n must be >= 1, got 0"),
                            (dict(port=10), "probe.port must be in [0, 9], got 10"),
                            (dict(mode="c"), "probe.mode must be one of 'a', 'b', got 'c'"),
                            (dict(cap=0.1), "probe.cap must be >= 0.5, got 0.1"),
                            (dict(n="many"), "probe.n must be >= 1, got 'many'")):
        with pytest.raises(ValueError) as e:
            check_fields(Probe(**kwargs), "probe")
        assert str(e.value) == message


@pytest.mark.parametrize("argv", [[], ["--model", "m", "--steps", "7", "--max-token-len", "99", "--optim.lr", "2e-5"],
                                  ["--no-env", "--atropos-url", "http://127.0.0.1:1", "--env.group_size", "4"]])
def test_a_runs_config_json_given_back_reproduces_the_config(tmp_path, argv):
    """`<run>/config.json` lists the derived fields too; given back with --config it yields the same config."""
    cfg = C.parse_args(argv)
    C.write_config(cfg, tmp_path / "config.json")
    again = C.parse_args(["--config", str(tmp_path / "config.json")])
    assert C.to_dict(again) == C.to_dict(cfg)
    changed = C.parse_args(["--config", str(tmp_path / "config.json"), "--steps", "11"])
    assert (changed.run.steps, changed.optim.total_steps, changed.atropos.num_steps) == (11, 11, 11)
