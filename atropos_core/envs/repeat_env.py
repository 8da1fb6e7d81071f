"""The built-in offline environment: "say WORD" → the policy must answer WORD (one token).

An unmodified atroposlib `BaseEnv` subclass: it samples a group of completions per prompt from our
inference server through atroposlib's own `ServerManager` (`server_type="vllm"`, the `/generate`
route), scores each with a program (exact match of the answer word), and posts the scored group to
the trajectory API. Nothing leaves the machine: the tokenizer is a local directory.

Why this task. A random-initialised tiny model puts ~1/V of its mass on any one token, so a task
with one right token out of 512 gives GRPO almost no signal. The default model is therefore
warm-started on the *format only* (`warm_start_format`): prompts followed by a uniformly random
word from the answer set. It then answers with some listed word, right 1/K of the time
(K = len(WORDS)): a dense, honest starting reward (~0.125), and everything above that is learned
from reward alone. Verifiable by a program, learnable on two CPU cores in minutes.

Why one token. With multi-token answers ending in end-of-sequence, a negative advantage on a wrong
answer also pushes down the end-of-sequence token after it; with the tiny model (in-process
simulation) the policy then stopped ending its answers and reward collapsed to 0. Every answer
word is a single token of the tiny tokenizer, so the completion is exactly one sampled token.

Why on policy. The environment may hold one batch in the API queue (`max_batches_offpolicy` 1,
`BUILTIN_MAX_BATCHES_OFFPOLICY`): it samples batch N+1 once the trainer took batch N. Room for one
batch ahead (2) was measured on this task's demo on 2 cores: the same loop time within run-to-run spread
and the same learning, on data 2-3x staler; this environment is slower than its trainer, so
there is little for it to overlap. Where the environment is the faster side (the echo benchmark)
one batch ahead halves the step: docs/offpolicy.md, "One batch ahead".
`--env.max_batches_offpolicy 2` gives it.

Run as its own process (the driver does this):
    python -m atropos_core.envs.repeat_env serve --env.rollout_server_url URL \
        --env.tokenizer_name MODEL_DIR --openai.base_url http://127.0.0.1:PORT/v1 \
        --openai.server_type vllm --openai.api_key KEY ...
"""
from __future__ import annotations

import logging
import random
from typing import List, Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

from . import BUILTIN_MAX_BATCHES_OFFPOLICY

logger = logging.getLogger(__name__)

WORDS = ["red", "green", "blue", "black", "white", "cat", "dog", "sun"]


def prompt_for(word: str) -> str:
    return f"say {word}"


def score_completion(word: str, completion: str) -> float:
    """1.0 when the answer (text before end-of-sequence, stripped) is exactly `word`, else 0.0."""
    return 1.0 if completion.strip() == word else 0.0


class RepeatEnvConfig(BaseEnvConfig):
    max_new_tokens: int = Field(default=1, description="Tokens sampled per completion")
    temperature: float = Field(default=1.0, description="Sampling temperature")
    seed: int = Field(default=0, description="Seed of the prompt order")


class RepeatEnv(BaseEnv):
    name = "repeat_word"
    env_config_cls = RepeatEnvConfig

    @classmethod
    def config_init(cls) -> Tuple[RepeatEnvConfig, List[APIServerConfig]]:
        # 16 groups in flight: the demo's batch (128 sequences of 8 per group) in one wave of requests
        # that vLLM batches, not atroposlib's default 8 per server in two (wait for data 0.19 -> 0.12 s
        # a step, docs/loop-speed-2026-12-01.md).
        env = RepeatEnvConfig(group_size=8, use_wandb=False, wandb_name="repeat_word", max_token_length=64,
                              max_batches_offpolicy=BUILTIN_MAX_BATCHES_OFFPOLICY, ensure_scores_are_not_same=False,
                              total_steps=1000,
                              include_messages=False, steps_per_eval=10**9, max_num_workers_per_node=16)
        server = APIServerConfig(server_type="vllm", model_name="default", api_key="local",
                                 base_url="http://127.0.0.1:9001/v1", num_requests_for_eval=1, timeout=120)
        return env, [server]

    async def setup(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._eos = self.tokenizer.eos_token_id

    async def get_next_item(self) -> str:
        return self._rng.choice(WORDS)

    async def evaluate(self, *args, **kwargs) -> None:
        return None

    async def collect_trajectories(self, item: str) -> Tuple[Optional[ScoredDataGroup], list]:
        prompt_ids = self.tokenizer.encode(prompt_for(item), add_special_tokens=False)
        _, outputs, logprobs, _ = await self.server.tokens_and_logprobs_completion(
            input_ids=list(prompt_ids), n=self.config.group_size, max_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature)
        group: ScoredDataGroup = {"tokens": [], "masks": [], "scores": [], "inference_logprobs": []}
        for out, lps in zip(outputs, logprobs):
            if self._eos in out:  # train on the answer up to and including end-of-sequence
                cut = out.index(self._eos) + 1
                out, lps = out[:cut], lps[:cut]
            text = self.tokenizer.decode([t for t in out if t != self._eos])
            group["tokens"].append(list(prompt_ids) + out)
            group["masks"].append([-100] * len(prompt_ids) + out)
            group["scores"].append(score_completion(item, text))
            group["inference_logprobs"].append([1.0] * len(prompt_ids) + list(lps))
        return group, []


def warm_start_format(model_dir, *, steps: int = 150, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> None:
    """Teach the format only: after "say W" comes some word of WORDS (uniformly random, NOT W). Uses the trainer's own fused loss with advantage 1 (plain SFT). Overwrites the
    model in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atropos_core.loss import advantage_weighted_sft_loss

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for _ in range(batch):
            p = tok.encode(prompt_for(rng.choice(WORDS)), add_special_tokens=False)
            a = tok.encode(" " + rng.choice(WORDS), add_special_tokens=False)
            rows.append(p + a)
            masks.append([0.0] * len(p) + [1.0] * len(a))
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([m + [0.0] * (width - len(m)) for m in masks])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss, _ = advantage_weighted_sft_loss(model, ids, torch.ones_like(mask), mask, attention_mask=attn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(str(model_dir), safe_serialization=True)


def build_default_model(model_dir, seed: int = 0):
    """The default run's model: the tiny Qwen2 of `tiny_model`, warm-started on the task format.
    Idempotent (a `.warm_started` marker records a finished build)."""
    from pathlib import Path

    from atropos_core.envs.tiny_model import build_tiny_model

    out = Path(model_dir)
    if (out / ".warm_started").exists():
        return out
    build_tiny_model(out, seed=seed)
    warm_start_format(out, seed=seed)
    (out / ".warm_started").write_text("format warm start done\n")
    return out


if __name__ == "__main__":
    RepeatEnv.cli()
