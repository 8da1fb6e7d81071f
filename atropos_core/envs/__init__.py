"""Built-in offline environments and the tiny local model/tokenizer they run with."""

#: The built-in environment's module: `env.module`'s default, and how the launcher and the config
#: recognise it in an entry.
BUILTIN_ENV = "atropos_core.envs.repeat_env"
#: Batches the built-in environment may hold in the API queue (its `max_batches_offpolicy`): 1, on
#: policy (why not one batch ahead: `repeat_env`'s module docstring).
BUILTIN_MAX_BATCHES_OFFPOLICY = 1
