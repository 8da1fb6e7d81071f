"""Run an Atropos environment module as `python -m MODULE ...` would, with atroposlib 0.4.0 made to
work under transformers 5: `python -m atropos_core.envs.run_env MODULE serve --env.* ...`.

The launcher starts every environment through this module (`services.environment_command`). The
environment's code and atroposlib are not changed; one compatibility default is restored first:

* transformers 5 changed `apply_chat_template(..., tokenize=True)` to return a `BatchEncoding`
  (`return_dict=True` by default; 4.x returned the token ids). atroposlib 0.4.0's
  `tokenize_for_trainer`, which most chat-completion environments call to build the trainer's
  tokens and masks, takes `len()` of that result and slices it, so it produced a dict of two keys
  for `tokens` and a two-entry mask (seen with transformers 5.19; the API then refuses the group).
  Here a call that does not pass `return_dict` gets `return_dict=False` again, the 4.x behaviour
  that atroposlib was written for; a caller that asks for a dict still gets one.
"""
from __future__ import annotations

import functools
import runpy
import sys


def restore_chat_template_ids() -> None:
    """Make `apply_chat_template(tokenize=True)` return token ids unless `return_dict` is given."""
    from transformers import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.apply_chat_template
    if getattr(original, "_atropos_ids_default", False):
        return

    @functools.wraps(original)
    def apply_chat_template(self, conversation, *args, **kwargs):
        if kwargs.get("tokenize", True) and "return_dict" not in kwargs and not args:
            kwargs["return_dict"] = False
        return original(self, conversation, *args, **kwargs)

    apply_chat_template._atropos_ids_default = True
    PreTrainedTokenizerBase.apply_chat_template = apply_chat_template


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m atropos_core.envs.run_env MODULE serve [--env.* ...] [--openai.* ...]")
    restore_chat_template_ids()
    module, rest = argv[0], argv[1:]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
