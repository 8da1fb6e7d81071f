"""The held-out echo task of bench/bench_e2e.py, as an unmodified atroposlib environment.

Each prompt is `PROMPT_LEN` distinct capital letters (single tokens of the tiny byte-level BPE
tokenizer, never merged, so text and token ids round-trip for TRL's text prompts); the
policy samples `max_new_tokens` (6) tokens, and the reward is the fraction of them that echo a
token of the prompt (an end-of-sequence token, and everything after it, scores 0). A random
300-token model echoes ~1% of the time, so what is learned is copying from the context: the
reward a trainer reaches in N steps measures learning per step, not a memorised answer. The same
task and reward are used for TRL's in-process GRPO row (`echo_reward`), so both rows see the same
prompts (same seed) and the same scoring.

    python -m bench.echo_env serve --env.rollout_server_url URL --env.tokenizer_name DIR ...
"""
from __future__ import annotations

import random
import string
from typing import List, Optional, Sequence, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

PROMPT_LEN = 3
POOL = string.ascii_uppercase


def echo_prompt(rng: random.Random) -> str:
    return "".join(rng.sample(POOL, PROMPT_LEN))


def echo_reward(prompt: Sequence[int], completion: Sequence[int], eos: int, length: int) -> float:
    """Fraction of the `length` completion positions holding a prompt token (0 from EOS on)."""
    want, hits = set(prompt), 0
    for t in list(completion)[:length]:
        if t == eos:
            break
        hits += t in want
    return hits / length


class EchoEnvConfig(BaseEnvConfig):
    max_new_tokens: int = Field(default=6, description="Tokens sampled per completion")
    seed: int = Field(default=0, description="Seed of the prompts")


class EchoEnv(BaseEnv):
    name = "echo"
    env_config_cls = EchoEnvConfig

    @classmethod
    def config_init(cls) -> Tuple[EchoEnvConfig, List[APIServerConfig]]:
        env = EchoEnvConfig(group_size=4, use_wandb=False, wandb_name="echo", max_token_length=64,
                            max_batches_offpolicy=1, ensure_scores_are_not_same=False, total_steps=10**6,
                            include_messages=False, steps_per_eval=10**9)
        server = APIServerConfig(server_type="vllm", model_name="default", api_key="local",
                                 base_url="http://127.0.0.1:9001/v1", num_requests_for_eval=1, timeout=120)
        return env, [server]

    async def setup(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._eos = self.tokenizer.eos_token_id

    async def get_next_item(self) -> list[int]:
        return self.tokenizer.encode(echo_prompt(self._rng), add_special_tokens=False)

    async def evaluate(self, *args, **kwargs) -> None:
        return None

    async def collect_trajectories(self, item: list[int]) -> Tuple[Optional[ScoredDataGroup], list]:
        n = self.config.max_new_tokens
        _, outputs, logprobs, _ = await self.server.tokens_and_logprobs_completion(
            input_ids=list(item), n=self.config.group_size, max_tokens=n, temperature=1.0)
        group: ScoredDataGroup = {"tokens": [], "masks": [], "scores": [], "inference_logprobs": []}
        for out, lps in zip(outputs, logprobs):
            group["tokens"].append(list(item) + list(out))
            group["masks"].append([-100] * len(item) + list(out))
            group["scores"].append(echo_reward(item, out, self._eos, n))
            group["inference_logprobs"].append([1.0] * len(item) + list(lps))
        return group, []


if __name__ == "__main__":
    EchoEnv.cli()
