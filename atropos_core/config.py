"""One typed config for a whole run, composed of each component's own dataclass, and its CLI.

Every component owns its config dataclass next to its code (`AtroposConfig` in client.py,
`ModelConfig` in model.py, ...), validated in its `__post_init__`. `TrainConfig` composes them;
this module adds only what belongs to the run itself (`RunConfig`), the inference servers we start
(`InferenceConfig`) and the built-in environment (`EnvConfig`).

CLI: every field of every section is an override, `--section.field VALUE` (or `=VALUE`), e.g.
`--optim.lr 3e-4 --loss.loss_type grpo`. A config file (`--config FILE`, TOML or JSON, with one
table per section) is applied first, then the command line. The common fields have short
spellings (`--model`, `--steps`, `--out`, `--resume`, `--atropos-url`, `--inference-port`,
`--no-env`). Values are parsed by the field's type; a wrong section, field or value ends at start-up
with one message that names it. The resolved config is written to `<run dir>/config.json`.

Presets: with no `--model` (or `--preset demo`) the demo preset (`DEMO_PRESET`) fills the fields
the user did not set, and the launcher says so once; with `--model` every other field keeps its
dataclass default, the one `--help` shows. Lengths: `run.max_token_len` (`--max-token-len`),
`data.max_token_len` and `atropos.max_token_len` are one setting (see `model_source`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .batch import DataConfig
from .checkpoint import CheckpointConfig
from .client import AtroposConfig
from .inference.launch import CPU_WEIGHT_LAYOUTS, check_user_vllm_args
from .loss import LossConfig
from .metrics import LoggingConfig
from .model import ModelConfig, OptimConfig
from .weight_sync import WeightSyncConfig


class ConfigError(ValueError):
    """A config or command-line mistake, reported at start-up naming the field."""


@dataclass
class RunConfig:
    steps: int = 1000
    """Optimizer steps to run (one Atropos batch per step)."""
    preset: str = "auto"
    """"demo": the built-in tiny model and task with the settings of `DEMO_PRESET` (announced at
    start); "none": the defaults shown by --help; "auto": demo when no --model is given, else none."""
    max_token_len: Optional[int] = None
    """The run's one sequence length (prompt + completion, tokens): vLLM's --max-model-len, the API
    registration and data validation all follow it (data./atropos.max_token_len are the same
    setting). None: the model's own limit, capped at 2048. More than the model's limit is an error."""
    out: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, curves.png, logs/, checkpoints/."""
    seed: int = 0
    """Seed of torch/python RNGs (model init, sampling in the trainer)."""
    start_api: bool = True
    """Start atroposlib's trajectory API as a child process (False when `--atropos-url` points at
    one that already runs; the built-in environment is then not started either)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"."""
    max_nonfinite_steps: int = 3
    """Consecutive skipped non-finite steps after which the run stops with an error."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"run.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.preset not in PRESETS:
            raise ValueError(f"run.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.max_token_len is not None and self.max_token_len < 2:
            raise ValueError(f"run.max_token_len must be >= 2 or None, got {self.max_token_len}")


@dataclass
class InferenceConfig:
    start: bool = True
    """Start our vLLM server(s) (with the weight-sync extension and Atropos's /generate route)."""
    host: str = "127.0.0.1"
    """Interface the inference server binds (loopback unless you ask otherwise)."""
    port: int = 0
    """Port of the first inference server; 0 picks a free one."""
    num_servers: int = 1
    """Data-parallel vLLM replicas (ports port, port+1, ... when port is fixed)."""
    startup_timeout_s: float = 300.0
    """How long a vLLM server may take to answer /health (cold start is 30-40 s on CPU)."""
    extra_args: str = ""
    """Extra command-line arguments for vLLM (shell quoting): they replace the launcher's own value of
    the same flag (--dtype, --seed, --enforce-eager, --gpu-memory-utilization, ...). The resolved
    command line of every server is written to `<run dir>/vllm_commands.txt`."""
    gpus: str = "auto"
    """GPU machines: where the servers run (`atropos_core.placement`). "auto": the GPUs after the
    trainer ranks' (colocated with the trainer, logged, when none are left); "colocate"; or a list
    of physical GPU ids such as "4,5,6,7" or "4-7" (tensor-parallel-size of them per server)."""
    cpu_weight_layout: str = "packed"
    """CPU servers only: "packed" is vLLM's oneDNN pre-packing (generation ~1.3-1.8x faster at
    n=16, every sync re-packs); "plain" keeps plain tensors that each sync copies into in place
    (sync ~1.7x faster on a 100M model). Measured trade-off: docs/weight_sync.md."""

    def __post_init__(self):
        if self.cpu_weight_layout not in CPU_WEIGHT_LAYOUTS:
            raise ValueError(f"inference.cpu_weight_layout must be one of {CPU_WEIGHT_LAYOUTS}, "
                             f"got {self.cpu_weight_layout!r}")
        if not (0 <= self.port < 65536):
            raise ValueError(f"inference.port must be in [0, 65535], got {self.port}")
        if self.num_servers < 1:
            raise ValueError(f"inference.num_servers must be >= 1, got {self.num_servers}")
        from .placement import check_gpus_spec

        check_gpus_spec(self.gpus)
        check_user_vllm_args(self.extra_args)


@dataclass
class EnvConfig:
    start: bool = True
    """Start the built-in environment (atropos_core.envs.repeat_env) as a child process."""
    module: str = "atropos_core.envs.repeat_env"
    """Python module of the environment to start (its `BaseEnv.cli()` runs with `serve`)."""
    modules: list[str] = field(default_factory=list)
    """Several environments at once (overrides `module`): one entry per environment process, each
    "MODULE [its own --env.* args]"; all feed the one API and sample from our servers. On the command
    line a JSON list or comma-separated, e.g. `--env.modules atropos_core.envs.repeat_env,my_env`.
    atroposlib pauses an environment while the API queue holds its `max_batches_offpolicy` batches,
    whoever queued them: give a slower one room (`--env.max_batches_offpolicy`) or a share of
    every batch (`--env.min_batch_allocation`) in its entry."""
    group_size: int = 8
    """Completions sampled per prompt (one Atropos group)."""
    max_new_tokens: int = 1
    """Tokens sampled per completion."""
    extra_args: str = ""
    """Extra `--env.*` / `--openai.*` arguments for the environment process, space separated."""

    @property
    def module_specs(self) -> list[str]:
        """One "MODULE [args]" entry per environment process to start."""
        return list(self.modules) if self.modules else [self.module]

    def __post_init__(self):
        for spec in self.module_specs:
            try:
                if not shlex.split(spec):
                    raise ValueError("empty entry")
            except ValueError as e:
                raise ValueError(f"env.modules entry {spec!r}: {e}") from None
        if self.group_size < 2:
            raise ValueError(f"env.group_size must be >= 2 (GRPO needs a group), got {self.group_size}")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    atropos: AtroposConfig = field(default_factory=AtroposConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    # A real run checkpoints every 100 steps by default (the demo preset: every 20).
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(
        dir=str(Path(RunConfig.out) / "checkpoints"), every=100))
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Short spellings of the fields a user types most: flag -> (section, field, value for a bare flag).
SHORTCUTS = {
    "--model": ("model", "path", None),
    "--steps": ("run", "steps", None),
    "--out": ("run", "out", None),
    "--seed": ("run", "seed", None),
    "--atropos-url": ("atropos", "url", None),
    "--inference-port": ("inference", "port", None),
    "--no-env": ("env", "start", "false"),
    "--resume": ("checkpoint", "resume", "auto"),
    "--no-inference": ("inference", "start", "false"),
    "--max-token-len": ("run", "max_token_len", None),
    "--preset": ("run", "preset", None),
}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def parse_value(raw: Any, tp, where: str):
    """Turn a command-line string (or a config-file value) into a value of type `tp`."""
    tp, optional = _strip_optional(tp)
    if isinstance(raw, str) and optional and raw.lower() in ("none", "null"):
        return None
    if not isinstance(raw, str):
        return raw  # from a JSON/TOML file: already typed; the dataclass validates it
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str or tp is Any:
            return raw
        if origin is typing.Literal:
            if raw not in typing.get_args(tp):
                raise ValueError(f"expected one of {typing.get_args(tp)}")
            return raw
        if (origin is list or tp is list) and not raw.lstrip().startswith("["):
            return [x.strip() for x in raw.split(",") if x.strip()]  # a,b,c
        if origin in (list, tuple, dict) or tp in (list, tuple, dict):
            val = json.loads(raw)
            return tuple(val) if (origin is tuple or tp is tuple) else val
        return raw
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: cannot parse {raw!r} as {getattr(tp, '__name__', tp)}: {e}") from None


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a new config with `{"section.field": value}` applied; each section re-validated."""
    per_section: dict[str, dict[str, Any]] = {}
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, raw in overrides.items():
        if "." not in key:
            raise ConfigError(f"unknown option {key!r}: use --section.field (sections: {', '.join(sections)})")
        sec, name = key.split(".", 1)
        if sec not in sections:
            hint = difflib.get_close_matches(sec, sections, n=1)
            raise ConfigError(f"unknown config section {sec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        hints = _field_types(type(getattr(cfg, sec)))
        if name not in hints or name.startswith("_"):
            close = difflib.get_close_matches(name, list(hints), n=1)
            raise ConfigError(f"unknown field {key!r}" + (f" (did you mean '{sec}.{close[0]}'?)" if close else
                                                            f"; fields of {sec}: {', '.join(hints)}"))
        per_section.setdefault(sec, {})[name] = parse_value(raw, hints[name], key)
    changes = {}
    for sec, kv in per_section.items():
        try:
            changes[sec] = dataclasses.replace(getattr(cfg, sec), **kv)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid value in section {sec!r}: {e}") from None
    return dataclasses.replace(cfg, **changes)


def _flatten_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    flat = {}
    for sec, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {sec!r} must be a table of fields")
        for k, v in table.items():
            flat[f"{sec}.{k}"] = v
    return flat


def config_help() -> str:
    lines = ["Every field below can be set with --section.field VALUE:"]
    defaults = TrainConfig()
    for sec in dataclasses.fields(TrainConfig):
        obj = getattr(defaults, sec.name)
        for f in dataclasses.fields(obj):
            if f.name.startswith("_"):
                continue
            lines.append(f"  --{sec.name}.{f.name} (default: {getattr(obj, f.name)!r})")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """Build the run's config from defaults, an optional config file and command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="drivers/train.py", description="Train a policy on Atropos batches; with no arguments, a "
        "complete local RL loop (API, vLLM, built-in environment, trainer) under the demo preset ("
        + ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items()) + "). With --model DIR or a hub id, the "
        "defaults below apply unchanged.",
        epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML or JSON file with one table per section")
    for flag, (sec, name, const) in SHORTCUTS.items():
        if flag == "--resume":
            parser.add_argument(flag, dest=f"short:{sec}.{name}", nargs="?", const=const, default=None,
                                help="resume from the newest complete checkpoint of the run dir, or from PATH")
        elif const is None:
            parser.add_argument(flag, dest=f"short:{sec}.{name}", help=f"same as --{sec}.{name}")
        else:
            parser.add_argument(flag, dest=f"short:{sec}.{name}", action="store_const", const=const,
                                help=f"same as --{sec}.{name} {const}")
    known, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    if known.config:
        path = Path(known.config)
        if not path.exists():
            raise ConfigError(f"--config: file {path} does not exist")
        overrides.update(_flatten_file(path))
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}")
        if "=" in tok:
            key, val = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"option {tok} needs a value")
            key, val = tok[2:], rest[i + 1]
            i += 2
        overrides[key] = val
    for dest, val in vars(known).items():
        if dest.startswith("short:") and val is not None:
            overrides[dest[len("short:"):]] = val
    return resolve(overrides)


PRESETS = ("auto", "demo", "none")
#: The three spellings of the run's one sequence length (see `RunConfig.max_token_len`).
LENGTH_KEYS = ("run.max_token_len", "data.max_token_len", "atropos.max_token_len")

# The demo preset (no --model given, or --preset demo): a tiny model learning the built-in task in
# minutes on CPU. lr 3e-3 with 16 groups of 8 per step lifts mean reward from ~0.13 to 0.5-0.8 in
# 50-80 steps (in-process simulation first, then real runs); 120 steps with a cosine floor of
# 0.2·lr end at ~0.69 over the last 10 steps, 3 min 13 s on an idle 2-core machine (README).
# Without the preset the dataclass defaults apply (those --help shows): a real model's settings.
DEMO_PRESET = {
    "run.steps": 120,
    "optim.lr": 3e-3,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 0.2,
    "atropos.batch_size": 128,
    "atropos.group_size": 8,
    "run.max_token_len": 64,
    "loss.loss_type": "grpo",
    "checkpoint.every": 20,
    "logging.plot_every": 5,
}


def _is_demo(overrides: dict[str, Any]) -> bool:
    preset = str(overrides.get("run.preset", "auto"))
    if preset not in PRESETS:
        raise ConfigError(f"run.preset must be one of {PRESETS}, got {preset!r}")
    return preset == "demo" or (preset == "auto" and not overrides.get("model.path"))


def _unify_lengths(overrides: dict[str, Any]) -> None:
    """The three length keys are one setting: every given one must agree; all three get the value."""
    given = {}
    for k in LENGTH_KEYS:
        raw = overrides.get(k)
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "auto", "")):
            continue
        try:
            given[k] = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{k}: cannot parse {raw!r} as int") from None
    if len(set(given.values())) > 1:
        raise ConfigError("the sequence length is one setting, given differently: "
                          + ", ".join(f"{k}={v}" for k, v in given.items()) + " (set only --max-token-len)")
    if given:
        v = next(iter(given.values()))
        overrides.update({k: v for k in LENGTH_KEYS})
    else:
        for k in LENGTH_KEYS:
            overrides.pop(k, None)


def resolve(overrides: dict[str, Any]) -> TrainConfig:
    """Defaults (plus the demo preset's when it applies), then `overrides`, plus the fields derived
    from others: checkpoint/log dirs under the run dir, schedule length = run length, one length."""
    overrides = dict(overrides)
    demo = _is_demo(overrides)
    if demo:
        user_keys = set(overrides)
        preset = {k: v for k, v in DEMO_PRESET.items() if k not in user_keys
                  and not (k in LENGTH_KEYS and user_keys & set(LENGTH_KEYS))}
        overrides = {**preset, **overrides}
    overrides["run.preset"] = "demo" if demo else "none"
    _unify_lengths(overrides)
    if "atropos.url" in overrides:  # an API that already runs: start neither it nor our env
        overrides.setdefault("run.start_api", "false")
        overrides.setdefault("env.start", "false")
        if overrides["atropos.url"] == "synthetic":  # batches drawn in the trainer: nothing to serve them
            overrides.setdefault("inference.start", "false")
    if str(overrides.get("env.start", "true")).lower() not in ("false", "0", "no", "off"):
        overrides.setdefault("atropos.group_size", overrides.get("env.group_size", EnvConfig.group_size))
    out = str(overrides.get("run.out", RunConfig.out))
    overrides.setdefault("checkpoint.dir", str(Path(out) / "checkpoints"))
    overrides.setdefault("logging.run_dir", out)
    overrides.setdefault("optim.total_steps", overrides.get("run.steps", RunConfig.steps))
    overrides.setdefault("atropos.num_steps", overrides.get("run.steps", RunConfig.steps))
    try:
        cfg = TrainConfig()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid default config: {e}") from None
    return apply_overrides(cfg, overrides)


def preset_note(cfg: TrainConfig) -> Optional[str]:
    """The one line that says the demo preset is in use and what it sets (None without it)."""
    if cfg.run.preset != "demo":
        return None
    values = []
    for key in DEMO_PRESET:
        sec, name = key.split(".", 1)
        values.append(f"{key}={getattr(getattr(cfg, sec), name)!r}")
    model = "the built-in tiny model and task" if not cfg.model.path else f"model {cfg.model.path}"
    return (f"using the demo preset ({model}): {', '.join(values)}; give --model DIR_OR_HUB_ID for your own "
            f"model with the defaults of --help (--preset none keeps them with the built-in model)")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def write_config(cfg: TrainConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    tmp.replace(path)
