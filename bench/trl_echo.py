"""TRL's GRPO trainer on the echo task (bench/echo_env.py), in one process: the row bench_e2e.py
sets beside ours. Same model directory (same initial weights), prompts from the same generator
and seed, the same reward, lr, group size, batch and completion length; HF `generate` samples.

    python bench/trl_echo.py MODEL_DIR --seed 0 --steps 300      # prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.echo_env import echo_prompt, echo_reward  # noqa: E402


def run_trl(model_dir: str, *, seed: int, steps: int, prompts_per_step: int = 4, group: int = 4,
            new_tokens: int = 6, lr: float = 3e-3, out_dir: str | None = None) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    texts = [echo_prompt(rng) for _ in range(steps * prompts_per_step)]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    data = Dataset.from_dict({"prompt": texts, "pid": ids})
    rewards_per_call: list[float] = []

    def reward(prompts, completions, completion_ids, pid, **kw):
        out = [echo_reward(p, c, tok.eos_token_id, new_tokens) for p, c in zip(pid, completion_ids)]
        rewards_per_call.append(sum(out) / len(out))
        return out

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(output_dir=out_dir or tempfile.mkdtemp(prefix="trl_echo_"), max_steps=steps,
                     learning_rate=lr, per_device_train_batch_size=prompts_per_step * group,
                     num_generations=group, max_completion_length=new_tokens, temperature=1.0,
                     use_cpu=True, seed=seed, report_to=[], logging_steps=1, disable_tqdm=True, save_strategy="no",
                     lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=data,
                          callbacks=[Clock()])
    trainer.train()
    # Logged after each step's clock stops (on_step_end comes first): the step time is not changed.
    logs = trainer.state.log_history
    return {"rewards": rewards_per_call, "step_s": times,
            "entropy": [h["entropy"] for h in logs if "entropy" in h],
            "frac_reward_zero_std": [h["frac_reward_zero_std"] for h in logs if "frac_reward_zero_std" in h]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    print(json.dumps(run_trl(a.model_dir, seed=a.seed, steps=a.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
