"""batch.py for off-policy training and distillation: behaviour policy in "auto" mode, per-sequence
temperature in Atropos's order, the teacher's top-k fields (alignment, truncation, validation).
The round trip through the real `run-api` (marker `api`) checks that these fields reach us as sent."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from atropos_core.batch import DataConfig, build_train_batch, reason_key, validate_group
from tests.fixtures.atropos_api import make_group
from tests.fixtures.batches import VOCAB, post_and_fetch

CFG = DataConfig(max_token_len=64, vocab_size=VOCAB, max_tokens_per_micro_batch=64)


def _rows_of(tb, k):
    """(micro-batch, row, position mask) holding kept sequence k."""
    for mb in tb.micro_batches:
        sel = mb.sequence_ids == k
        if sel.any():
            return mb, sel
    raise AssertionError(f"sequence {k} not found")


def _with_distill(rng, g, k=4, extra_at=None):
    ids, lps = [], []
    for s, toks in enumerate(g["tokens"]):
        ids_s, lps_s = [], []
        for t in range(len(toks)):
            if t == 0:
                ids_s.append([]), lps_s.append([])        # vLLM's prompt_logprobs[0] is None
                continue
            kk = k + (1 if extra_at == (s, t) else 0)
            row = rng.sample(range(VOCAB), kk)
            lp = sorted([-rng.uniform(0.05, 5.0) for _ in range(kk)], key=lambda x: rng.random())
            ids_s.append(row), lps_s.append(lp)
        ids.append(ids_s), lps.append(lps_s)
    g["distill_token_ids"], g["distill_logprobs"] = ids, lps
    return g


def test_auto_behaviour_policy_and_groups_without_it(caplog):
    rng = random.Random(0)
    groups = [make_group(rng, n=4, vocab=VOCAB) for _ in range(2)] + [make_group(rng, n=4, vocab=VOCAB, logprobs=False)]
    with caplog.at_level("INFO"):
        tb = build_train_batch(groups, CFG)
    assert tb.metrics["data/dropped"] == 0
    assert tb.metrics["data/sequences_without_inference_logprobs"] == 4
    for k in range(12):
        mb, sel = _rows_of(tb, k)
        assert mb.behaviour_mask[sel].all().item() == (k < 8)
        if k >= 8:
            assert (mb.old_logprobs[sel] == 0).all()
    # False ignores them; True drops the group that lacks them
    assert build_train_batch(groups, DataConfig(**{**CFG.__dict__, "use_inference_logprobs": False})) \
        .micro_batches[0].old_logprobs is None
    tb_req = build_train_batch(groups, DataConfig(**{**CFG.__dict__, "use_inference_logprobs": True}))
    assert tb_req.metrics["data/dropped/missing_logprobs"] == 1 and tb_req.num_groups == 2
    # a batch where nobody sent them carries no behaviour tensors
    tb_none = build_train_batch(groups[2:], CFG)
    assert tb_none.micro_batches[0].old_logprobs is None and tb_none.micro_batches[0].behaviour_mask is None


def test_temperature_precedence():
    rng = random.Random(1)
    g = make_group(rng, n=4, vocab=VOCAB)
    g["overrides"] = [{"temperature": 0.5}, None, {}, {"temperature": 1.5}]
    g["generation_params"] = {"temperature": 0.8}
    g["group_overrides"] = {"temperature": 0.9}
    g2 = make_group(rng, n=4, vocab=VOCAB)
    g2["group_overrides"] = {"temperature": 0.7}
    g3 = make_group(rng, n=4, vocab=VOCAB)                    # nothing: loss.temperature (0 here)
    tb = build_train_batch([g, g2, g3], CFG)
    want = [0.5, 0.8, 0.8, 1.5] + [0.7] * 4 + [0.0] * 4
    for k, t in enumerate(want):
        mb, sel = _rows_of(tb, k)
        assert torch.allclose(mb.temperature[sel], torch.tensor(t)), (k, mb.temperature[sel])
    assert build_train_batch([g3], CFG).micro_batches[0].temperature is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "hot", True])
def test_bad_temperature_drops_group(bad):
    rng = random.Random(2)
    g = make_group(rng, n=4, vocab=VOCAB)
    g["overrides"] = [None, {"temperature": bad}, None, None]
    ok, why = validate_group(g, CFG)
    assert not ok and reason_key(why) == "bad_temperature"
    tb = build_train_batch([g, make_group(rng, n=4, vocab=VOCAB)], CFG)
    assert tb.metrics["data/dropped/bad_temperature"] == 1 and tb.num_groups == 1


def test_distill_alignment_sorting_and_batch_k():
    rng = random.Random(3)
    g1 = _with_distill(rng, make_group(rng, n=3, vocab=VOCAB), k=4)
    g2 = _with_distill(rng, make_group(rng, n=3, vocab=VOCAB), k=3)   # the batch's smallest k
    g3 = make_group(rng, n=3, vocab=VOCAB)                            # no teacher
    tb = build_train_batch([g1, g2, g3], CFG)
    assert tb.metrics["data/dropped"] == 0 and tb.metrics["data/distill_top_k"] == 3
    assert tb.metrics["data/sequences_without_distill"] == 3
    for k, (g, i) in enumerate([(g1, 0), (g1, 1), (g1, 2), (g2, 0), (g2, 1), (g2, 2)]):
        mb, sel = _rows_of(tb, k)
        ids, lps, lm = mb.distill_ids[sel], mb.distill_logprobs[sel], mb.loss_mask[sel]
        assert ids.shape[-1] == 3
        for t in range(len(g["tokens"][i]) - 1):          # row position t predicts token t+1
            if lm[t] == 0:
                assert (ids[t] == -1).all() and (lps[t] == 0).all()
                continue
            pairs = sorted(zip(g["distill_logprobs"][i][t + 1], g["distill_token_ids"][i][t + 1]), reverse=True)[:3]
            assert ids[t].tolist() == [p[1] for p in pairs]
            assert torch.allclose(lps[t], torch.tensor([p[0] for p in pairs], dtype=torch.float32))
    mb, sel = _rows_of(tb, 7)
    assert (mb.distill_ids[sel] == -1).all()


BAD_DISTILL = {
    "ragged": (lambda g: _with_distill(random.Random(4), g, extra_at=(1, 4)), "bad_distill"),
    "k_mismatch": (lambda g: (_with_distill(random.Random(4), g), g["distill_logprobs"][0][4].pop())[0], "bad_distill"),
    "only_ids": (lambda g: (_with_distill(random.Random(4), g), g.__setitem__("distill_logprobs", None))[0], "bad_distill"),
    "out_of_vocab": (lambda g: (_with_distill(random.Random(4), g), g["distill_token_ids"][2][3].__setitem__(0, VOCAB))[0],
                     "token_out_of_range"),
    "negative_id": (lambda g: (_with_distill(random.Random(4), g), g["distill_token_ids"][2][3].__setitem__(0, -1))[0],
                    "token_out_of_range"),
    "nan": (lambda g: (_with_distill(random.Random(4), g), g["distill_logprobs"][1][4].__setitem__(1, float("nan")))[0],
            "non_finite"),
    "positive": (lambda g: (_with_distill(random.Random(4), g), g["distill_logprobs"][1][4].__setitem__(1, 0.5))[0],
                 "bad_logprobs"),
    "few_positions": (lambda g: (_with_distill(random.Random(4), g), g["distill_token_ids"][0].pop(),
                                 g["distill_logprobs"][0].pop())[0], "length_mismatch"),
    "few_sequences": (lambda g: (_with_distill(random.Random(4), g), g["distill_token_ids"].pop(),
                                 g["distill_logprobs"].pop())[0], "count_mismatch"),
    "not_lists": (lambda g: (_with_distill(random.Random(4), g), g["distill_token_ids"][0].__setitem__(4, 7))[0],
                  "bad_distill"),
}


@pytest.mark.parametrize("kind", list(BAD_DISTILL))
def test_bad_distill_group_dropped_and_counted(kind):
    rng = random.Random(5)
    make = lambda: make_group(rng, n=4, vocab=VOCAB, prompt_len=3, max_completion=6)  # noqa: E731
    bad = make()
    while min(len(t) for t in bad["tokens"]) < 5:   # positions 3-4 exist and are trained
        bad = make()
    fn, reason = BAD_DISTILL[kind]
    bad = fn(bad)
    good = _with_distill(random.Random(6), make())
    tb = build_train_batch([good, bad], CFG)
    assert tb.metrics.get(f"data/dropped/{reason}") == 1, tb.metrics
    assert tb.num_groups == 1 and tb.metrics["data/distill_top_k"] == 4


def test_untrained_positions_are_not_checked():
    """Prompt positions may carry anything list-shaped (vLLM gives position 0 nothing)."""
    rng = random.Random(7)
    g = _with_distill(rng, make_group(rng, n=2, vocab=VOCAB, prompt_len=3), k=2)
    g["distill_token_ids"][0][1] = [VOCAB + 5]                # prompt position: ignored
    g["distill_logprobs"][0][1] = [3.0]
    assert validate_group(g, CFG) == (True, "")


@pytest.mark.api
def test_fields_survive_the_real_api(atropos_api):
    rng = random.Random(8)
    groups = [_with_distill(rng, make_group(rng, n=4, vocab=VOCAB), k=3) for _ in range(4)]
    for g in groups:
        g["generation_params"] = {"temperature": 0.8}
        g["overrides"] = [{"temperature": 0.6}, {}, {}, {}]
    fetched = post_and_fetch(atropos_api.url, copy.deepcopy(groups))
    tb = build_train_batch(fetched, CFG)
    assert tb.metrics["data/dropped"] == 0 and tb.metrics["data/distill_top_k"] == 3
    temps = sorted(round(float(mb.temperature[mb.sequence_ids == k][0]), 6) for mb in tb.micro_batches
                   for k in set(mb.sequence_ids.flatten().tolist()) - {-1})
    assert temps == [0.6] * 4 + [0.8] * 12
