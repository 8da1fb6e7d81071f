"""A user's own model, environments and flags work on first contact (issue: first contact).

Every model here is built to differ from the built-in one (a 256- and a 4096-position model, one
with a chat template, one served from a hub cache the test builds), and the environments are a
token-level one (`repeat_env`, `/generate`) and a chat-completions one (`atropos_core/envs/chat_env`,
an unmodified atroposlib `BaseEnv` on `server_type="openai"`). The resolution logic has fast unit
tests; real vLLM servers start in two tests only (four cold starts in all).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from atropos_core import config as C
from atropos_core.client import env_metrics
from atropos_core.envs import BUILTIN_MAX_BATCHES_OFFPOLICY
from atropos_core.inference.vllm_command import merge_vllm_flags, vllm_server_command
from atropos_core.model_source import (ModelSourceError, model_max_len, output_head_transforms, output_logit_scale,
                                       resolve_max_token_len, resolve_model_path)
from atropos_core.procs import ManagedProcess, ServiceError, free_port
from atropos_core.services import RunServices, environment_command
from tests.fixtures.models import save_with_tokenizer

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "drivers" / "train.py")]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


# ---- models and a hub cache built here -------------------------------------------------------------

def _config_only(tmp: Path, **cfg) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({"model_type": "qwen2", **cfg}))
    return tmp


def build_model(out: Path, max_pos: int, chat: bool = False) -> Path:
    from atropos_core.envs.tiny_model import build_tiny_model

    build_tiny_model(out, max_position_embeddings=max_pos, seed=1)
    if chat:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out))
    return out


def build_hub_cache(cache: Path, repo_id: str, model_dir: Path, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture(scope="module")
def model_256_chat(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("m256chat"), 256, chat=True)


@pytest.fixture(scope="module")
def model_4096(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("m4096"), 4096)


# ---- lengths from one place (unit) ------------------------------------------------------------------

def test_length_resolution_follows_the_model(tmp_path):
    m256 = _config_only(tmp_path / "a", max_position_embeddings=256)
    m4096 = _config_only(tmp_path / "b", max_position_embeddings=4096)
    gpt2 = _config_only(tmp_path / "c", n_positions=1024, max_position_embeddings=8192)
    assert resolve_max_token_len(None, m256) == 256          # unset: the model's limit...
    assert resolve_max_token_len(None, m4096) == 2048        # ...capped at 2048
    assert resolve_max_token_len(3000, m4096) == 3000        # set: honoured up to the limit
    assert resolve_max_token_len(256, m256) == 256
    assert model_max_len(gpt2)[0] == 1024                    # the smallest of the keys vLLM reads
    with pytest.raises(ModelSourceError) as e:
        resolve_max_token_len(512, m256)
    assert "512" in str(e.value) and "256" in str(e.value) and "max_position_embeddings" in str(e.value)
    # A tokenizer's model_max_length bounds it too; the "no limit" sentinel does not.
    (m4096 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1000}))
    assert resolve_max_token_len(None, m4096) == 1000
    (m4096 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert resolve_max_token_len(None, m4096) == 2048
    none = _config_only(tmp_path / "d")
    assert resolve_max_token_len(None, none) == 2048 and resolve_max_token_len(10_000, none) == 10_000


def test_length_is_one_setting_in_the_config():
    for argv in (["--max-token-len", "100"], ["--data.max_token_len", "100"], ["--atropos.max_token_len", "100"],
                 ["--data.max_token_len", "100", "--atropos.max_token_len", "100"]):
        cfg = C.parse_args(["--model", "x/y", *argv])
        assert cfg.run.max_token_len == cfg.data.max_token_len == cfg.atropos.max_token_len == 100, argv
    with pytest.raises(C.ConfigError, match="data.max_token_len=100.*atropos.max_token_len=200"):
        C.parse_args(["--model", "x/y", "--data.max_token_len", "100", "--atropos.max_token_len", "200"])
    assert C.parse_args(["--model", "x/y"]).run.max_token_len is None     # resolved from the model at launch
    demo = C.parse_args([])
    assert demo.run.max_token_len == demo.data.max_token_len == 64
    assert C.parse_args(["--data.max_token_len", "96"]).atropos.max_token_len == 96  # the user's beats the preset's


def test_too_long_data_is_a_config_error_naming_both_numbers(tmp_path):
    model = _config_only(tmp_path / "m", max_position_embeddings=256)
    r = subprocess.run(TRAIN + ["--model", str(model), "--max-token-len", "512", "--atropos-url", "http://127.0.0.1:9",
                                "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if "config error" in ln]
    assert len(line) == 1 and "512" in line[0] and "256" in line[0], r.stderr[-2000:]


# ---- output heads the fused losses do not compute ------------------------------------------------------

def test_heads_that_change_the_logits_are_found_from_the_config():
    """Gemma-2's soft cap and an lm_head bias are found (the fused losses compute log-softmax(h @ W.T)
    only); Cohere's and Granite's constant factors are read as the scale the loss applies."""
    import transformers as tf

    for cfg in (tf.Qwen2Config(), tf.LlamaConfig(), tf.Qwen3Config(), tf.MistralConfig(), tf.GraniteConfig(),
                tf.Gemma3Config(), tf.PhiConfig(), tf.CohereConfig()):
        assert output_head_transforms(cfg.to_dict()) == [], type(cfg).__name__
    assert output_head_transforms(tf.Gemma2Config().to_dict()) == ["final_logit_softcapping=30.0"]
    assert output_head_transforms({"text_config": {"final_logit_softcapping": 50.0}}) == ["final_logit_softcapping=50.0"]
    assert output_head_transforms({}, {"model.embed_tokens.weight", "lm_head.bias"}) == ["an lm_head bias"]
    assert output_logit_scale(tf.Qwen2Config().to_dict()) == output_logit_scale(tf.GraniteConfig().to_dict()) == 1.0
    assert output_logit_scale(tf.CohereConfig().to_dict()) == 0.0625              # logits * logit_scale
    assert output_logit_scale(tf.GraniteConfig(logits_scaling=8.0).to_dict()) == 0.125   # logits / logits_scaling
    with pytest.raises(ModelSourceError, match="logits_scaling=0.0"):
        output_logit_scale({"logits_scaling": 0.0})


def test_a_logit_scale_the_forward_does_not_apply_is_refused_at_load(tmp_path, tiny_model_dir):
    """A config that names a scale its model's forward ignores (a Qwen2 with `logit_scale` set): the
    loader's probe sees that the logits are not scale · (h @ W.T) and refuses, naming the scale."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    from atropos_core.model import ModelConfig, load_model_and_tokenizer

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg.logit_scale = 0.5
    save_with_tokenizer(Qwen2ForCausalLM(cfg), tmp_path / "m", tiny_model_dir)
    with pytest.raises(ValueError, match=r"logit scale of 0.5, but its logits are not"):
        load_model_and_tokenizer(ModelConfig(path=str(tmp_path / "m"), attn_implementation="sdpa"), torch.device("cpu"))


def _tiny_family(out: Path, family: str, tokenizer_dir: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256)
    model = {"gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=32)),
             "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**common))}[family]()
    return save_with_tokenizer(model, out, tokenizer_dir)


def test_a_model_whose_head_changes_the_logits_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    """A real Gemma-2 checkpoint (soft cap 30) and a Phi one (lm_head bias): refused by name at launch
    (one config-error line, exit 2) and when loaded for training. On a
    random tiny model the soft cap changes the logits by ~1e-7, so no numeric check would see it."""
    import torch

    from atropos_core.model import ModelConfig, load_model_and_tokenizer
    from atropos_core.model_source import check_output_head

    gemma = _tiny_family(tmp_path / "gemma2", "gemma2", tiny_model_dir)
    phi = _tiny_family(tmp_path / "phi", "phi", tiny_model_dir)
    with pytest.raises(ModelSourceError, match=r"final_logit_softcapping=30\.0.*not supported"):
        check_output_head(gemma)
    with pytest.raises(ModelSourceError, match="an lm_head bias"):
        check_output_head(phi)
    check_output_head(tiny_model_dir)
    for d, what in ((gemma, "final_logit_softcapping"), (phi, "lm_head bias")):
        with pytest.raises(ValueError, match=what):
            load_model_and_tokenizer(ModelConfig(path=str(d), attn_implementation="sdpa"), torch.device("cpu"))
    r = subprocess.run(TRAIN + ["--model", str(gemma), "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if "config error" in ln]
    assert len(line) == 1 and "final_logit_softcapping=30.0" in line[0], r.stderr[-2000:]


# ---- hub ids -----------------------------------------------------------------------------------------

def test_hub_id_resolves_to_the_cached_snapshot_offline(tmp_path, monkeypatch):
    model = _config_only(tmp_path / "src", max_position_embeddings=300)
    snap = build_hub_cache(tmp_path / "hub", "test-org/tiny-300", model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model_path("test-org/tiny-300")
    assert path.resolve() == snap.resolve() and (path / "config.json").is_file()
    assert resolve_max_token_len(None, path) == 300
    assert resolve_model_path(str(model)) == model        # a directory stays a directory
    with pytest.raises(ModelSourceError) as e:
        resolve_model_path("test-org/not-there")
    msg = str(e.value)
    assert "test-org/not-there" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    with pytest.raises(ModelSourceError, match="neither a model directory nor a hub id"):
        resolve_model_path("./no/such/dir")


def test_missing_hub_id_fails_with_one_line(tmp_path):
    r = subprocess.run(TRAIN + ["--model", "test-org/absent-model", "--atropos-url", "http://127.0.0.1:9",
                                "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
                                HF_HUB_CACHE=str(tmp_path / "empty_hub")))
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "test-org/absent-model" in errors[0], r.stderr[-2000:]


# ---- no silent preset ---------------------------------------------------------------------------------

DERIVED = {"run.preset", "model.path", "checkpoint.dir", "logging.run_dir", "optim.total_steps", "atropos.num_steps",
           "atropos.group_size"}


def _flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, sec in C.to_dict(cfg).items() for k, v in sec.items()}


def test_model_changes_nothing_else_and_the_demo_preset_is_announced_once(tmp_path, caplog):
    from atropos_core.services import resolve_model_dir

    defaults, mine = _flat(C.TrainConfig()), _flat(C.parse_args(["--model", str(tmp_path)]))
    changed = {k for k in defaults if defaults[k] != mine[k]} - DERIVED
    assert not changed, {k: (defaults[k], mine[k]) for k in changed}
    assert mine["atropos.group_size"] == mine["env.group_size"] and mine["run.preset"] == "none"
    assert mine["optim.total_steps"] == mine["atropos.num_steps"] == mine["run.steps"]
    demo = C.parse_args([])
    assert demo.run.preset == "demo"
    assert all(_flat(demo)[k] == v for k, v in C.DEMO_PRESET.items())
    # Announced once, naming what it sets (an explicit --preset demo with a model of one's own).
    model = _config_only(tmp_path / "m", max_position_embeddings=128)
    cfg = C.parse_args(["--preset", "demo", "--model", str(model), "--steps", "7"])
    assert cfg.run.steps == 7 and cfg.optim.lr == C.DEMO_PRESET["optim.lr"]
    with caplog.at_level(logging.INFO, logger="atropos_core.services"):
        resolve_model_dir(cfg)
    notes = [r.getMessage() for r in caplog.records if "demo preset" in r.getMessage()]
    assert len(notes) == 1 and "run.steps=7" in notes[0] and "optim.lr=0.003" in notes[0], notes
    assert C.preset_note(C.parse_args(["--model", str(model)])) is None


# ---- the user's vLLM flags win -----------------------------------------------------------------------

def test_user_vllm_flags_replace_ours(tmp_path):
    cmd = vllm_server_command(tmp_path, port=1234, max_model_len=300,
                              extra_args=["--dtype", "bfloat16", "--seed=7", "--no-enforce-eager",
                                          "--gpu_memory_utilization", "0.5"])
    flags = [c.split("=", 1)[0] for c in cmd if c.startswith("--")]
    assert len(flags) == len(set(flags)), cmd                      # no flag twice
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and "--seed=7" in cmd and "--seed" not in cmd
    assert "--enforce-eager" not in cmd and "--no-enforce-eager" in cmd
    assert cmd[cmd.index("--max-model-len") + 1] == "300"           # ours where the user said nothing
    assert merge_vllm_flags(["--a", "1", "--b"], ["--b"]) == ["--a", "1", "--b"]
    for flag, field in (("--port 9", "inference.port"), ("--max-model-len=4", "run.max_token_len"),
                        ("--model m", "model.path")):
        with pytest.raises(C.ConfigError, match=field):
            C.parse_args(["--model", "x/y", "--inference.extra_args", flag])
    with pytest.raises(C.ConfigError, match="extra_args"):
        C.parse_args(["--inference.extra_args", "--seed '3"])


# ---- every replica, several environments: the environment's command -----------------------------------

def test_environment_command_names_every_replica(tmp_path):
    import yaml

    urls = ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
    for module, server_type in (("atropos_core.envs.repeat_env", "vllm"), ("atropos_core.envs.chat_env", "openai")):
        yml = tmp_path / f"{server_type}.yaml"
        cmd = environment_command(module, api_url="http://127.0.0.1:8000", inference_urls=urls, tokenizer_dir="/tok",
                                  group_size=4, max_token_len=256, model_name="org/m", config_path=yml,
                                  extra_args=["--env.seed", "3", "--openai.timeout", "77"])
        assert cmd[cmd.index("-m") + 1:cmd.index("-m") + 3] == ["atropos_core.envs.run_env", module]
        assert not any(c.startswith("--openai.") for c in cmd), cmd   # atroposlib refuses them with a list
        assert cmd[cmd.index("--config") + 1] == str(yml) and cmd[-2:] == ["--env.seed", "3"]
        servers = yaml.safe_load(yml.read_text())["openai"]
        assert [s["base_url"] for s in servers] == [u + "/v1" for u in urls]
        assert all(s["server_type"] == server_type and s["model_name"] == "org/m" and s["timeout"] == "77"
                   for s in servers), servers
    one = environment_command("atropos_core.envs.repeat_env", api_url="http://a:1", inference_urls=urls[:1],
                              tokenizer_dir="/tok", group_size=4, max_token_len=256)
    assert one[one.index("--openai.base_url") + 1] == urls[0] + "/v1" and "--openai.server_type" not in one


def test_env_metrics_split_reward_by_env_id():
    groups = [{"env_id": 0, "scores": [1.0, 0.0]}, {"env_id": 1, "scores": [1.0, 1.0, 1.0]},
              {"env_id": 0, "scores": [1.0, float("nan")]}, {"env_id": None, "scores": [0.5]}, {"scores": "bad"}]
    m = env_metrics(groups)
    assert m == {"reward/env0": 2 / 3, "data/sequences_env0": 3, "reward/env1": 1.0, "data/sequences_env1": 3,
                 "reward/envunknown": 0.5, "data/sequences_envunknown": 1}


@pytest.mark.parametrize("args, ahead", [
    ([], BUILTIN_MAX_BATCHES_OFFPOLICY),                                      # the built-in env's default
    (["--env.extra_args", "--env.max_batches_offpolicy 1"], 1),               # the user's flag wins
    (["--env.extra_args", "--env.max_batches_offpolicy 1 --env.max_batches_offpolicy=4"], 4),  # the last one
    (["--env.module", "my.env"], None),                                       # a user's env: its own default
    (["--env.modules", '["my.env --env.max_batches_offpolicy 3", "atropos_core.envs.repeat_env"]'], 1),
    (["--env.modules", '["my.env --env.max_batches_offpolicy 3", "atropos_core.envs.repeat_env --env.max_batches_offpolicy 2"]'], 2),
    (["--env.modules", '["my.env --env.max_batches_offpolicy 3", "other.env"]'], None),
    (["--env.extra_args", "--env.max_batches_offpolicy x"], None),             # not a number: not known
    (["--env.extra_args", "--env.max_batches_offpolicy '2"], None),           # unbalanced quote: not known
    (["--env.start", "false"], None),                                         # no environment started
])
def test_env_max_batches_offpolicy_is_what_the_started_environments_were_given(args, ahead):
    assert C.parse_args(args).env.max_batches_offpolicy() == ahead


def test_the_builtin_environment_runs_on_policy():
    from atropos_core.envs.repeat_env import RepeatEnv
    env_cfg, _ = RepeatEnv.config_init()
    assert env_cfg.max_batches_offpolicy == BUILTIN_MAX_BATCHES_OFFPOLICY == 1


def test_env_modules_keep_the_single_spelling():
    assert C.parse_args([]).env.module_specs == ["atropos_core.envs.repeat_env"]
    assert C.parse_args(["--env.module", "my.env"]).env.module_specs == ["my.env"]
    cfg = C.parse_args(["--env.modules", '["a.env --env.x 1", "b.env"]'])
    assert cfg.env.module_specs == ["a.env --env.x 1", "b.env"]
    assert C.parse_args(["--env.modules", "a.env,b.env"]).env.module_specs == ["a.env", "b.env"]


def test_chat_tokenization_for_the_trainer_gives_token_ids(tmp_path, monkeypatch):
    """atroposlib 0.4.0's tokenize_for_trainer under transformers 5, as our env runner sets it up."""
    from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    # The runner patches the class in its own process; undo it here when the test ends.
    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", PreTrainedTokenizerBase.apply_chat_template)
    from atropos_core.envs.run_env import restore_chat_template_ids
    from atropos_core.envs.tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = CHAT_TEMPLATE
    restore_chat_template_ids()
    chat = [{"role": "user", "content": "say red"}, {"role": "assistant", "content": " red"}]
    out = tokenize_for_trainer(tok, chat)
    full = tok.encode("user: say red\nassistant:  red\n", add_special_tokens=False)
    assert out["tokens"] == full and len(out["masks"]) == len(full)
    prefix = len(tok.encode("user: say red\nassistant:", add_special_tokens=False))
    assert out["masks"][:prefix] == [-100] * prefix and out["masks"][prefix:] == full[prefix:]
    assert "input_ids" in tok.apply_chat_template(chat, return_dict=True)   # who asks for a dict gets one


# ---- a dead child is the reported reason ----------------------------------------------------------------

def test_dead_child_is_reported_whichever_call_notices(tmp_path):
    from atropos_core.services import VLLMServerHandle

    port = free_port()
    proc = ManagedProcess("vllm0", [sys.executable, "-c", "print('engine core started', flush=True);"
                                    "import time; time.sleep(600)"], tmp_path / "vllm0.log").start()
    services = RunServices(tmp_path)
    services.vllm.append(VLLMServerHandle(url=f"http://127.0.0.1:{port}", token="t" * 16, process=proc,
                                          model_dir=tmp_path))
    try:
        assert services.dead_child(grace_s=0.2) is None                 # all alive: nothing to report
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        with pytest.raises(requests.ConnectionError):                   # the first call to notice fails...
            requests.post(f"http://127.0.0.1:{port}/weights/prepare", timeout=5)
        dead = services.dead_child(grace_s=5)                           # ...the dead child is the reason
        assert isinstance(dead, ServiceError)
        assert f"vLLM server http://127.0.0.1:{port} (pid {proc.pid}) exited with code -9" in str(dead)
        assert "engine core started" in str(dead)                        # with its log tail
    finally:
        services.stop_all()


# ---- malformed /generate requests (the schema alone, then the live server) -------------------------------

def _deep(n: int) -> str:
    return '{"prompt": {"prompt_token_ids": [1]}, "x": ' + "[" * n + "]" * n + "}"


MALFORMED = [
    {"prompt": {"prompt_token_ids": [1, 2]}, "stop": 5},                     # once an assertion inside vLLM
    {"prompt": {"prompt_token_ids": [1, 2]}, "stop": [1, 2]},
    {"prompt": {"prompt_token_ids": []}},
    {"prompt": {"prompt_token_ids": ["a", "b"]}},
    {"prompt": {"prompt_token_ids": [1.5]}},
    {"prompt": {"prompt_token_ids": [True]}},
    {"prompt": {"prompt_token_ids": [-1]}},
    {"prompt": {"prompt_token_ids": [2**40]}},
    {"prompt": {"prompt_token_ids": 5}},
    {"prompt": {"prompt_token_ids": [1], "extra": 1}},
    {"prompt": 17},
    {"prompt": ""},
    {"prompt": None},
    {},
    {"prompt": {"prompt_token_ids": [1, 2]}, "n": 0},
    {"prompt": {"prompt_token_ids": [1, 2]}, "n": "2"},
    {"prompt": {"prompt_token_ids": [1, 2]}, "n": True},
    {"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 0},
    {"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 1.5},
    {"prompt": {"prompt_token_ids": [1, 2]}, "temperature": -1.0},
    {"prompt": {"prompt_token_ids": [1, 2]}, "temperature": "hot"},
    {"prompt": {"prompt_token_ids": [1, 2]}, "top_p": 0.0},
    {"prompt": {"prompt_token_ids": [1, 2]}, "top_p": 2.0},
    {"prompt": {"prompt_token_ids": [1, 2]}, "stop_token_ids": ["x"]},
    {"prompt": {"prompt_token_ids": [1, 2]}, "ignore_eos": "yes"},
    {"prompt": {"prompt_token_ids": [1, 2]}, "logprobs": "0"},
    {"prompt": {"prompt_token_ids": [1, 2]}, "seed": 2**70},
    {"prompt": {"prompt_token_ids": [1, 2]}, "repetition_penalty": 0.0},
]
RAW_MALFORMED = [b"[1, 2]", b"not json", b'{"prompt": ', _deep(100_000).encode(),
                 b'{"prompt": {"prompt_token_ids": [1]}, "temperature": NaN}']


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_generate_schema_refuses(body):
    from atropos_core.inference.server import parse_generate_request

    with pytest.raises(ValueError, match="invalid /generate request"):
        parse_generate_request(body)


@pytest.mark.vllm
def test_every_malformed_generate_request_gets_a_4xx(vllm_server):
    url = f"{vllm_server.url}/generate"
    log = vllm_server.handle.process.log_path
    before = log.read_text(errors="replace").count("Traceback")
    for body in MALFORMED:
        r = requests.post(url, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"], (body, r.status_code, r.text[:300])
    for raw in RAW_MALFORMED:
        r = requests.post(url, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"], (raw[:60], r.status_code, r.text[:300])
    ok = requests.post(url, json={"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 2, "stop": ["zz"],
                                  "logprobs": 0, "temperature": 1, "ignored_key": 1}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["token_ids"][0]) >= 1, ok.text[:300]
    assert log.read_text(errors="replace").count("Traceback") == before   # nothing blew up inside


# ---- real servers: both lengths serve what the data length allows ---------------------------------------

@pytest.mark.vllm
@pytest.mark.slow
def test_both_model_lengths_start_and_serve_the_data_length(tmp_path, model_4096):
    """The 256-position model with the length unset (its limit, 256) and the 4096-position one with
    --max-token-len 1024: each server serves prompt + completion up to that length, never past it.
    The two servers start side by side (a cold start is mostly one process importing at a time: on
    2 cores two at once are ready well before two in turn would be), then are checked in turn."""
    from concurrent.futures import ThreadPoolExecutor

    m256 = build_model(tmp_path / "m256", 256)
    cases = []
    for model, requested, expect in ((m256, None, 256), (model_4096, 1024, 1024)):
        n = resolve_max_token_len(requested, model)
        assert n == expect
        cases.append((model, n, RunServices(tmp_path / f"run{n}")))
    try:
        # Started from worker threads, the servers get no PDEATHSIG (`procs`): `finally` stops them.
        with ThreadPoolExecutor(len(cases)) as pool:
            starts = [pool.submit(services.start_inference, str(model), max_model_len=n, timeout=400)
                      for model, n, services in cases]
            for start in starts:
                start.result()
        for model, n, services in cases:
            url = services.inference_urls[0]
            served = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            assert served["max_model_len"] == n
            prompt = [(7 * i) % 300 + 1 for i in range(n - 8)]
            ok = requests.post(f"{url}/generate", json={"prompt": {"prompt_token_ids": prompt}, "max_tokens": 8,
                                                        "ignore_eos": True, "logprobs": 0}, timeout=120)
            assert ok.status_code == 200, ok.text[:300]
            assert len(prompt) + len(ok.json()["token_ids"][0]) == n       # the whole length is served
            # One token more asked for: vLLM shortens the completion to the length (never past it)...
            capped = requests.post(f"{url}/generate", json={"prompt": {"prompt_token_ids": prompt + [1]},
                                                            "max_tokens": 8, "ignore_eos": True}, timeout=120)
            assert capped.status_code == 200 and len(capped.json()["token_ids"][0]) == 7, capped.text[:300]
            # ...and a prompt that fills it alone is refused.
            over = requests.post(f"{url}/generate", json={"prompt": {"prompt_token_ids": [1] * n},
                                                          "max_tokens": 1}, timeout=120)
            assert over.status_code == 400 and f"maximum model length of {n}" in over.text, over.text[:300]
            cmd = (tmp_path / f"run{n}" / "vllm_commands.txt").read_text().split()
            assert cmd[cmd.index("--max-model-len") + 1] == str(n)
    finally:
        for _, _, services in cases:
            services.stop_all()


# ---- end to end: hub id, two replicas, two environments (one chat), the user's flags ---------------------

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.api
@pytest.mark.timeout(1500)
def test_user_setup_trains_end_to_end(tmp_path, model_256_chat):
    repo_id = "test-org/tiny-chat-256"
    snap = build_hub_cache(tmp_path / "hub", repo_id, model_256_chat)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               OMP_NUM_THREADS="1")
    steps = 6
    # atroposlib: an environment stops sampling while the API queue holds max_batches_offpolicy batches,
    # whoever queued them, and a batch is the queue's oldest groups: either environment can fill every
    # batch of a short run (which one registers first, env 0, and which one is faster both vary). A
    # share of each batch for each of them (a quarter: one group of 4) makes the API build no batch
    # without both once both have registered (atroposlib `api/utils.py`
    # `grab_batch_with_minimum_allocations`).
    share = "--env.min_batch_allocation 0.25"
    modules = [f"atropos_core.envs.repeat_env {share}", f"atropos_core.envs.chat_env {share}"]
    cmd = TRAIN + ["--model", repo_id, "--out", str(run), "--steps", str(steps), "--inference.num_servers", "2",
                   "--env.modules", json.dumps(modules),
                   "--env.group_size", "4", "--atropos.batch_size", "16", "--optim.lr", "1e-4",
                   "--inference.extra_args", "--enable-log-requests --seed 3", "--checkpoint.every", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1400, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    # One length everywhere, from the model (256), on the snapshot the hub id resolved to.
    cfg = json.loads((run / "config.json").read_text())
    assert Path(cfg["model"]["path"]).resolve() == snap.resolve()
    assert cfg["run"]["max_token_len"] == cfg["data"]["max_token_len"] == cfg["atropos"]["max_token_len"] == 256
    commands = (run / "vllm_commands.txt").read_text().splitlines()
    assert len(commands) == 2
    for line in commands:
        argv = line.split()
        assert argv[argv.index("--max-model-len") + 1] == "256" and Path(argv[argv.index("--model") + 1]) == Path(
            cfg["model"]["path"])
        assert argv.count("--seed") == 1 and argv[argv.index("--seed") + 1] == "3" and "--enable-log-requests" in argv
    # Every replica served; both kinds of request reached our servers.
    logs = [p.read_text(errors="replace") for p in sorted((run / "logs").glob("vllm*_*.log"))]
    assert len(logs) == 2
    for text in logs:  # n > 1 requests are logged per child ("<i>_<id>"): real rollouts, not health checks
        assert re.search(r"Added request \d+_atropos-", text) and re.search(r"Added request \d+_chatcmpl-", text), \
            text[-2000:]
    # Both environments in every batch: the trainer takes its first batch only once both have
    # registered (`AtroposClient.wait_for_envs`), and from then on the API builds no batch without
    # each one's share (a quarter: 4 of 16). Before that wait, in some runs the chat env registered
    # only as the run ended and every batch was the repeat env's (docs/loop-speed-2026-12-01.md).
    assert "2 environment(s) registered with the Atropos API" in out, out[-3000:]
    for row in rows:  # every batch is 16 sequences, each counted for the environment that sent it
        assert row.get("data/sequences_env0", 0) >= 4 and row.get("data/sequences_env1", 0) >= 4, row
        assert sum(v for k, v in row.items() if k.startswith("data/sequences_env")) == 16, row
        assert all(0.0 <= row[f"reward/env{e}"] <= 1.0 for e in (0, 1)), row
    assert out.count("demo preset") == 0
