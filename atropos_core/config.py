"""One typed config for a whole run, composed of each component's own dataclass, and its CLI.

Every component owns its config dataclass next to its code (`AtroposConfig` in client.py,
`ModelConfig` in model.py, ...): a docstring under each field, its range or choices declared in the
annotation (`atropos_core.checks`), cross-field checks in `__post_init__`. `TrainConfig` composes
them; this module adds only what belongs to the run itself (`RunConfig`), the inference servers we
start (`InferenceConfig`) and the built-in environment (`EnvConfig`).

CLI: an `argparse` parser generated from the dataclasses (`build_parser`): every field of every
section is `--section.field VALUE` (or `=VALUE`), its help the field's docstring and its default
the dataclass's. We generate it ourselves rather than through a dataclass-CLI library because the
spellings users already type must keep working: JSON or comma-separated lists, `true`/`false`
values for booleans, `none` for Optional fields, the short flags of `SHORTCUTS` (`--resume` with an
optional path), and values that start with `--` (vLLM flags in `inference.extra_args`). A config file
(`--config FILE`, TOML or JSON, one table per section) is applied first, then the command line.
A wrong section, field or value ends at start-up with one `ConfigError` that names it (with the
closest field name for a typo). The resolved config is written to `<run dir>/config.json`.

Derived fields (`DERIVED`) are not settings: `data.max_token_len` and `atropos.max_token_len`
follow `run.max_token_len`; `optim.total_steps` and `atropos.num_steps` follow `run.steps`;
`atropos.group_size` follows `env.group_size` (when we start the environment or the group size is
given); `data.vocab_size` and `data.pad_token_id` come from the model at load. `--help` does not
list them. The old spellings of the two that users typed (`--data.max_token_len`,
`--atropos.max_token_len`, `--atropos.group_size`) still work as their one setting, and must agree
when several are given; setting a step count or the vocabulary is a ConfigError naming the field it
follows.

Presets: with no `--model` (or `--preset demo`) the demo preset (`DEMO_PRESET`) fills the fields
the user did not set, and the launcher says so once; with `--model` every other field keeps its
dataclass default, the one `--help` shows. How the preset's values were chosen: docs/config.md.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import shlex
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from .data import DataConfig
from .envs import BUILTIN_ENV, BUILTIN_MAX_BATCHES_OFFPOLICY
from .checks import Between, Ge, OneOf, check_fields, choices_of
from .checkpoint import CheckpointConfig
from .client import AtroposConfig
from .inference.vllm_command import CPU_WEIGHT_LAYOUT_CHOICES, check_user_vllm_args
from .loss import LossConfig
from .metrics import LoggingConfig
from .model import ModelConfig, OptimConfig
from .weight_sync import WeightSyncConfig


class ConfigError(ValueError):
    """A config or command-line mistake, reported at start-up naming the field."""


PRESETS = ("auto", "demo", "none")


@dataclass
class RunConfig:
    """The run itself: its length, directory, seed, device and preset."""

    steps: Annotated[int, Ge(1)] = 1000
    """Optimizer steps to run (one Atropos batch per step)."""
    preset: Annotated[str, OneOf(PRESETS)] = "auto"
    """"demo": the built-in tiny model and task with the settings of `DEMO_PRESET` (announced at
    start); "none": the defaults shown by --help; "auto": demo when no --model is given, else none."""
    max_token_len: Optional[Annotated[int, Ge(2)]] = None
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"."""
    max_nonfinite_steps: Annotated[int, Ge(1)] = 3
    """Consecutive skipped non-finite steps after which the run stops with an error."""

    def __post_init__(self):
        check_fields(self, "run")


@dataclass
class InferenceConfig:
    """The vLLM servers the run starts."""

    start: bool = True
    """Start our vLLM server(s) (with the weight-sync extension and Atropos's /generate route)."""
    host: str = "127.0.0.1"
    """Interface the inference server binds (loopback unless you ask otherwise)."""
    port: Annotated[int, Between(0, 65535)] = 0
    """Port of the first inference server; 0 picks a free one."""
    num_servers: Annotated[int, Ge(1)] = 1
    """Data-parallel vLLM replicas (ports port, port+1, ... when port is fixed)."""
    startup_timeout_s: float = 300.0
    """How long a vLLM server may take to answer /health (a cold start on CPU takes tens of seconds)."""
    extra_args: str = ""
    """Extra command-line arguments for vLLM (shell quoting): they replace the launcher's own value of
    the same flag (--dtype, --seed, --enforce-eager, --gpu-memory-utilization, ...). The resolved
    command line of every server is written to `<run dir>/vllm_commands.txt`."""
    gpus: str = "auto"
    """GPU machines: where the servers run (`atropos_core.placement`). "auto": the GPUs after the
    trainer ranks' (colocated with the trainer, logged, when none are left); "colocate"; or a list
    of physical GPU ids such as "4,5,6,7" or "4-7" (tensor-parallel-size of them per server)."""
    cpu_weight_layout: Annotated[str, OneOf(CPU_WEIGHT_LAYOUT_CHOICES)] = "auto"
    """CPU servers only: "packed" is vLLM's oneDNN pre-packing (faster generation on big models,
    every sync re-packs); "plain" keeps plain tensors that each sync copies into in place (faster
    sync); "auto" is plain up to 32 MiB of weights, packed above. Measured: docs/weight_sync.md."""

    def __post_init__(self):
        check_fields(self, "inference")
        from .placement import check_gpus_spec

        check_gpus_spec(self.gpus)
        check_user_vllm_args(self.extra_args)


def _last_flag_value(args: list[str], flag: str) -> Optional[str]:
    """The value of the last `flag VALUE` or `flag=VALUE` in `args`, or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


@dataclass
class EnvConfig:
    """The environment processes the run starts."""

    start: bool = True
    """Start the built-in environment (atropos_core.envs.repeat_env) as a child process."""
    module: str = BUILTIN_ENV
    """Python module of the environment to start (its `BaseEnv.cli()` runs with `serve`)."""
    modules: list[str] = field(default_factory=list)
    """Several environments at once (overrides `module`): one entry per environment process, each
    "MODULE [its own --env.* args]"; all feed the one API and sample from our servers. On the command
    line a JSON list or comma-separated, e.g. `--env.modules atropos_core.envs.repeat_env,my_env`.
    atroposlib pauses an environment while the API queue holds its `max_batches_offpolicy` batches,
    whoever queued them: give a slower one room (`--env.max_batches_offpolicy`) or a share of
    every batch (`--env.min_batch_allocation`) in its entry."""
    group_size: Annotated[int, Ge(2)] = 8
    """Completions sampled per prompt (one Atropos group; GRPO needs two or more). The environments we
    start use it and `atropos.group_size` (checked against `atropos.batch_size`) follows it; for
    environments you run yourself (`--atropos-url`) it is checked only when you give it."""
    max_new_tokens: int = 1
    """Tokens sampled per completion."""
    extra_args: str = ""
    """Extra `--env.*` / `--openai.*` arguments for the environment process, space separated."""

    @property
    def module_specs(self) -> list[str]:
        """One "MODULE [args]" entry per environment process to start."""
        return list(self.modules) if self.modules else [self.module]

    def entries(self) -> list[tuple[str, list[str]]]:
        """(module, its arguments) per environment process to start: `extra_args`, then the entry's
        own (so an entry's flag wins). ValueError for unbalanced quotes."""
        shared = shlex.split(self.extra_args)
        return [(module, shared + own) for module, *own in map(shlex.split, self.module_specs)]

    def max_batches_offpolicy(self) -> Optional[int]:
        """The fewest batches any environment this run starts may hold in the API queue (its
        `--env.max_batches_offpolicy`, the last one given in its entry or `extra_args`; the built-in
        environment's default when it has none), or None when that is not known here: no environment
        started, or one of the user's without the flag (its own default applies)."""
        if not self.start:
            return None
        try:
            entries = self.entries()
        except ValueError:  # unbalanced quotes: the launch refuses them first; here, not known
            return None
        rooms = []
        for module, args in entries:
            room = _last_flag_value(args, "--env.max_batches_offpolicy")
            if room is None and module == BUILTIN_ENV:
                room = str(BUILTIN_MAX_BATCHES_OFFPOLICY)
            try:
                rooms.append(int(room))
            except (TypeError, ValueError):  # absent, or not a number (atroposlib's CLI rejects that)
                return None
        return min(rooms)

    def __post_init__(self):
        for spec in self.module_specs:
            try:
                if not shlex.split(spec):
                    raise ValueError("empty entry")
            except ValueError as e:
                raise ValueError(f"env.modules entry {spec!r}: {e}") from None
        check_fields(self, "env")


@dataclass
class TrainConfig:
    """A whole run: one section per component (`--section.field` on the command line)."""

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

    def __post_init__(self):
        """The lengths and step counts that follow the run's one setting (`DERIVED`) agree with it,
        also after a `dataclasses.replace` of the run section."""
        n, steps = self.run.max_token_len, self.run.steps
        if n is not None:
            self.data = _with(self.data, max_token_len=n)
            self.atropos = _with(self.atropos, max_token_len=n)
        self.optim = _with(self.optim, total_steps=steps)
        self.atropos = _with(self.atropos, num_steps=steps)


def _with(section, **values):
    """`section` with `values` (a new, re-validated object only when something changes)."""
    if all(getattr(section, k) == v for k, v in values.items()):
        return section
    return dataclasses.replace(section, **values)


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

#: Fields the run derives (not settings, not in --help) -> what they follow.
DERIVED = {
    "data.max_token_len": "run.max_token_len (--max-token-len)",
    "atropos.max_token_len": "run.max_token_len (--max-token-len)",
    "optim.total_steps": "run.steps (--steps)",
    "atropos.num_steps": "run.steps (--steps)",
    "atropos.group_size": "env.group_size",
    "data.vocab_size": "the model's embedding (read when the model loads)",
    "data.pad_token_id": "the model's tokenizer (read when the model loads)",
}
#: The run's one sequence length and its old spellings, accepted as the same setting.
LENGTH_KEYS = ("run.max_token_len", "data.max_token_len", "atropos.max_token_len")
#: Settings whose old spellings (all but the first) still work as the first; they must agree.
ALIASES = (LENGTH_KEYS, ("env.group_size", "atropos.group_size"))
_ALIAS_OF = {k: keys[0] for keys in ALIASES for k in keys}
#: Defaults that follow `run.out` (shown so in --help).
_FOLLOWS_OUT = {"checkpoint.dir": "<run.out>/checkpoints", "logging.run_dir": "<run.out>"}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def parse_value(raw: Any, tp, where: str):
    """Turn a command-line string (or a config file's string) into a value of type `tp`; values a
    TOML/JSON file already typed pass unchanged (the dataclass checks them)."""
    tp, optional = _strip_optional(tp)
    if isinstance(raw, str) and optional and raw.lower() in ("none", "null"):
        return None
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp in (int, float):
            return tp(raw)
        if (origin is list or tp is list) and not raw.lstrip().startswith("["):
            return [x.strip() for x in raw.split(",") if x.strip()]  # a,b,c
        if origin in (list, tuple, dict) or tp in (list, tuple, dict):
            val = json.loads(raw)
            return tuple(val) if (origin is tuple or tp is tuple) else val
        return raw  # str, Literal (the dataclass checks the choice)
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: cannot parse {raw!r} as {getattr(tp, '__name__', tp)}: {e}") from None


def _sections() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _check_key(key: str) -> tuple[str, str]:
    """(section, field) of a settable `key`, or a ConfigError naming the mistake."""
    sections = _sections()
    if key in DERIVED and key not in _ALIAS_OF:
        raise ConfigError(f"{key} is not a setting: it follows {DERIVED[key]}")
    if "." not in key:
        raise ConfigError(f"unknown option {key!r}: use --section.field (sections: {', '.join(sections)})")
    sec, name = key.split(".", 1)
    if sec not in sections:
        hint = difflib.get_close_matches(sec, sections, n=1)
        raise ConfigError(f"unknown config section {sec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    names = [f.name for f in dataclasses.fields(sections[sec]) if f.init and not f.name.startswith("_")]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"unknown field {key!r}" + (f" (did you mean '{sec}.{close[0]}'?)" if close else
                                                        f"; fields of {sec}: {', '.join(names)}"))
    return sec, name


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a new config with `{"section.field": value}` applied; each section re-validated."""
    per_section: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        sec, name = _check_key(key)
        tp = typing.get_type_hints(_sections()[sec])[name]
        per_section.setdefault(sec, {})[name] = parse_value(raw, tp, key)
    changes = {}
    try:
        for sec, kv in per_section.items():
            changes[sec] = dataclasses.replace(getattr(cfg, sec), **kv)
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid value in section {sec!r}: {e}") from None


def _read_file(path: Path) -> dict[str, Any]:
    """`{"section.field": value}` of a TOML or JSON file with one table per section."""
    if not path.is_file():
        raise ConfigError(f"--config: file {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
        raise ConfigError(f"--config {path}: the top level must be tables of fields, one per section")
    flat = {f"{sec}.{k}": v for sec, table in data.items() for k, v in table.items()}
    # A run's own config.json (`write_config`) lists the derived fields too: they are derived again.
    return {k: v for k, v in flat.items() if not (k in DERIVED and k not in _ALIAS_OF)}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` and of its dataclass bases (what --help shows)."""
    docs = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(c))).body[0].body
        docs.update({a.target.id: inspect.cleandoc(b.value.value) for a, b in zip(body, body[1:])
                     if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                     and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)})
    return docs


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a ConfigError (the driver prints one line and exits 2)."""

    def error(self, message):
        raise ConfigError(message)


def _metavar(tp) -> str:
    tp, optional = _strip_optional(tp)
    name = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp) or (
        "LIST" if typing.get_origin(tp) is list else "JSON")
    return name + ("|none" if optional else "")


def build_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The CLI: `--config`, the shortcuts, and `--section.field` for every settable field, each
    stored under its "section.field" key only when given. Also returns the flags that take a value."""
    p = _Parser(
        prog="drivers/train.py", allow_abbrev=False, usage="%(prog)s [--config FILE] [--section.field VALUE ...]",
        description="Train a policy on Atropos batches; with no arguments, a complete local RL loop (API, "
        "vLLM, built-in environment, trainer) under the demo preset (" + ", ".join(
            f"{k}={v}" for k, v in DEMO_PRESET.items()) + "). With --model DIR or a hub id, the defaults "
        "below apply unchanged. Booleans take true/false, Optional fields none, lists JSON or a,b,c.")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with one table per section, applied "
                   "before the command line")
    takes_value = set()
    short = p.add_argument_group("shortcuts")
    for flag, (sec, name, const) in SHORTCUTS.items():
        key = f"{sec}.{name}"
        if flag == "--resume":
            short.add_argument(flag, dest=key, nargs="?", const=const, default=argparse.SUPPRESS, metavar="PATH",
                               help="resume from the newest complete checkpoint of the run dir, or from PATH")
        elif const is None:
            short.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE", help=f"same as --{key}")
            takes_value.add(flag)
        else:
            short.add_argument(flag, dest=key, action="store_const", const=const, default=argparse.SUPPRESS,
                               help=f"same as --{key} {const}")
    defaults = TrainConfig()
    for sec, cls in _sections().items():
        group = p.add_argument_group(sec, (cls.__doc__ or "").strip().splitlines()[0])
        docs, hints, plain = field_docs(cls), typing.get_type_hints(cls, include_extras=True), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            if not f.init or f.name.startswith("_") or (key in DERIVED and key not in _ALIAS_OF):
                continue
            takes_value.add(f"--{key}")
            if _ALIAS_OF.get(key, key) != key:  # an old spelling of the setting it names
                group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                continue
            choices = choices_of(hints[f.name])
            default = _FOLLOWS_OUT.get(key, repr(getattr(getattr(defaults, sec), f.name)))
            text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
            group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=text,
                               metavar="{" + ",".join(map(str, choices)) + "}" if choices else _metavar(plain[f.name]))
    return p, takes_value


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """Build the run's config from defaults, an optional config file and command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, takes_value = build_parser()
    # argparse reads a value that starts with "-" as an option (vLLM flags in inference.extra_args):
    # pass such values glued, `--flag=VALUE`.
    glued, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            glued.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            glued.append(argv[i])
            i += 1
    known, rest = parser.parse_known_args(glued)
    for tok in rest:
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}")
        _check_key(tok[2:].split("=", 1)[0])
        raise ConfigError(f"unknown option {tok!r}")  # a flag of another kind (e.g. a single dash)
    given = vars(known)
    config_file = given.pop("config", None)
    overrides = _read_file(Path(config_file)) if config_file else {}
    overrides.update(given)
    return resolve(overrides)


# The demo preset (no --model given, or --preset demo): a tiny model learning the built-in task in
# minutes on CPU (how these values were chosen: docs/config.md). Without the preset the dataclass
# defaults apply (those --help shows): a real model's settings.
DEMO_PRESET = {
    "run.steps": 120,
    "optim.lr": 3e-3,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 0.2,
    "atropos.batch_size": 128,
    "env.group_size": 8,
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


def _unify(overrides: dict[str, Any], keys: tuple[str, ...]) -> None:
    """`keys` spell one int setting: every given one must agree; all of them get the value."""
    given = {}
    for k in keys:
        raw = overrides.get(k)
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "auto", "")):
            continue
        try:
            given[k] = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{k}: cannot parse {raw!r} as int") from None
    if len(set(given.values())) > 1:
        raise ConfigError("one setting given differently: " + ", ".join(f"{k}={v}" for k, v in given.items())
                          + f" (set only --{keys[0]})")
    if given:
        overrides.update({k: next(iter(given.values())) for k in keys})
    else:
        for k in keys:
            overrides.pop(k, None)


def resolve(overrides: dict[str, Any]) -> TrainConfig:
    """Defaults (plus the demo preset's when it applies), then `overrides`, plus the fields derived
    from others: checkpoint/log dirs under the run dir, schedule length = run length, one length,
    one group size."""
    overrides = dict(overrides)
    for key in overrides:
        _check_key(key)
    demo = _is_demo(overrides)
    if demo:
        user = {_ALIAS_OF.get(k, k) for k in overrides}
        overrides = {**{k: v for k, v in DEMO_PRESET.items() if _ALIAS_OF.get(k, k) not in user}, **overrides}
    overrides["run.preset"] = "demo" if demo else "none"
    for keys in ALIASES:
        _unify(overrides, keys)
    if "atropos.url" in overrides:  # an API that already runs: start neither it nor our env
        overrides.setdefault("run.start_api", "false")
        overrides.setdefault("env.start", "false")
        if overrides["atropos.url"] == "synthetic":  # batches drawn in the trainer: nothing to serve them
            overrides.setdefault("inference.start", "false")
    env_start = str(overrides.get("env.start", "true")).lower() not in ("false", "0", "no", "off")
    if env_start or "env.group_size" in overrides:
        overrides.setdefault("atropos.group_size", overrides.get("env.group_size", EnvConfig.group_size))
    out = str(overrides.get("run.out", RunConfig.out))
    overrides.setdefault("checkpoint.dir", str(Path(out) / "checkpoints"))
    overrides.setdefault("logging.run_dir", out)
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
