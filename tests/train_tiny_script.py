"""A tiny deterministic training run for the kill-and-resume test (tests/test_checkpoint.py).

Batches come from the GLOBAL torch RNG, so a resumed run only matches an uninterrupted one if the
checkpoint restored the RNG state too. `--kill-at-commit STEP` injects the fault: the process
SIGKILLs itself when the checkpoint of STEP is fully written but not yet committed (renamed).

    python tests/train_tiny_script.py --model DIR --ckpt DIR --steps 6 --every 2 --out final.pt \
        [--resume] [--kill-at-commit 4]
"""
from __future__ import annotations

import argparse
import os
import signal

import torch

from atropos_core import checkpoint as ck
from atropos_core.loss import LossConfig
from atropos_core.model import ModelConfig, OptimConfig, build_optimizer, load_model_and_tokenizer
from atropos_core.trainer import train_step
from atropos_core.types import MicroBatch


def batch(vocab: int, R: int = 2, T: int = 9) -> MicroBatch:
    ids = torch.randint(0, vocab, (R, T))
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    lm = torch.ones(R, T)
    lm[:, -1] = 0
    return MicroBatch(input_ids=ids, targets=targets, loss_mask=lm, advantages=torch.randn(R, T),
                      attention_mask=torch.ones(R, T, dtype=torch.int64),
                      position_ids=torch.arange(T).expand(R, T).clone(), old_logprobs=-6.0 + 0.2 * torch.randn(R, T))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at-commit", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1234)

    if args.kill_at_commit is not None:
        real_commit = ck._commit

        def commit_or_die(tmp, final):
            if final.name == f"step-{args.kill_at_commit:08d}":
                os.kill(os.getpid(), signal.SIGKILL)
            real_commit(tmp, final)

        ck._commit = commit_or_die

    cpu = torch.device("cpu")
    model, tok = load_model_and_tokenizer(ModelConfig(path=args.model, attn_implementation="sdpa"), cpu)
    opt, sched = build_optimizer(model, OptimConfig(lr=5e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine",
                                                    total_steps=args.steps, min_lr_ratio=0.1))
    loss_cfg = LossConfig(loss_type="grpo", backend="torch")
    cfg = ck.CheckpointConfig(dir=args.ckpt, every=args.every, keep_last=2, resume="auto" if args.resume else None)
    start = 0
    path = ck.resolve_resume(cfg)
    if path is not None:
        start = ck.load_checkpoint(path, model, opt, sched)["step"]
    for step in range(start + 1, args.steps + 1):
        mb = batch(model.config.vocab_size)
        train_step(model, opt, sched, [mb], loss_cfg, global_normalizer=mb.num_trained_tokens, grad_clip=1.0)
        if cfg.should_save(step):
            ck.save_checkpoint(cfg.dir, step, model, opt, sched, tok, keep_last=cfg.keep_last)
    torch.save({"start": start, "step": args.steps, "lr": sched.get_last_lr(),
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optim": opt.state_dict()["state"]}, args.out)


if __name__ == "__main__":
    main()
