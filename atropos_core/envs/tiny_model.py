"""Build a tiny Qwen2-family causal LM and a byte-level BPE tokenizer locally (no hub, no network).

The model is random-initialised and small enough to train on two CPU cores. Its shape follows what
vLLM's CPU attention backend accepts (head size 64: hidden 128 with 2 heads; vLLM's CPU attention supports
only some head sizes, 64 among them).
The tokenizer is a byte-level BPE trained with `tokenizers`: that kind round-trips exactly through
the `Qwen2Tokenizer` that `AutoTokenizer` picks from `config.json` (a word-level one would be
silently re-read wrongly), so vLLM, atroposlib and the trainer, which each load it on their own,
agree on every id.

`python -m atropos_core.envs.tiny_model OUT_DIR [--tied]` builds one from the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# Text the BPE merges are learned from: the characters and words the built-in tasks use.
_WORDS = ("red green blue black white cat dog sun moon tree apple say repeat copy answer count "
          "question reverse upper lower the a of and is to what sum plus minus times").split()


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"{a} + {b} = {a + b}")
        out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))))
        out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6))) + " :")
    return out


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer, save it (tokenizer.json + config) to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None,
                                   unk_token=None)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | Path, *, tie_embeddings: bool = False, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 256,
                     vocab_size: int = 512, max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Write a random-initialised Qwen2 model and its tokenizer to `out_dir`; return the path.

    Idempotent: a directory that already holds a complete model is returned unchanged.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=vocab_size, seed=seed)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_embeddings,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_theta=10000.0, use_sliding_window=False, torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    # A generation config without sampling overrides: vLLM reads it as default sampling params.
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))
    logger.info("built tiny model (%d params, tied=%s) in %s",
                sum(p.numel() for p in model.parameters()), tie_embeddings, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(build_tiny_model(args.out_dir, tie_embeddings=args.tied))


if __name__ == "__main__":
    main()
