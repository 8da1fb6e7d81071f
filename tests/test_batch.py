"""atropos_core.data: validation, advantages, packing, rank split, shipping between ranks.

Every tensor `build_train_batch` makes is compared with `reference_rows` (tests/fixtures/batches.py),
a plain-Python loop written from the Atropos conventions (mask/advantage/logprob at t belong to token t; the model
predicts token t from t-1). The bad-input tests post real groups through the real `run-api`
(marker `api`), fetch them with the client and check that exactly the bad group is dropped and
counted while its batch-mates come through; faults the server cannot carry (NaN: it answers 500;
wrong JSON types: pydantic refuses them) are injected into a fetched batch instead.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random

import pytest
import torch

from atropos_core.data import (DROP_REASONS, DataConfig, build_train_batch, groups_from_json_bytes,
                               groups_from_tensor, groups_to_json_bytes, groups_to_tensor, plan_micro_batches,
                               reason_key, split_for_ranks, validate_group)
from tests.fixtures.atropos_api import make_group
from tests.fixtures.batches import VOCAB, check_against_reference, post_and_fetch


def good_groups(seed: int, k: int = 3, n: int = 4, **kw) -> list[dict]:
    rng = random.Random(seed)
    return [make_group(rng, n=n, vocab=VOCAB, **kw) for _ in range(k)]


# ---- advantages and packing against the reference (no server) ---------------------------------

CONFIGS = [
    dict(advantage_scale="group"),
    dict(advantage_scale="batch", layout="packed"),
    dict(advantage_scale="none", advantage_norm="batch", advantage_clip=(-1.0, 1.5)),
    dict(advantage_scale="group", advantage_norm="batch", layout="packed", max_tokens_per_micro_batch=7),
    dict(advantage_scale="group", max_tokens_per_micro_batch=5, use_inference_logprobs=True, use_ref_logprobs=True),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_build_matches_reference(overrides):
    overrides = dict(overrides)
    rng = random.Random(1)
    groups = [make_group(rng, n=4, vocab=VOCAB) for _ in range(4)]
    groups.append(make_group(rng, n=4, vocab=VOCAB, scores=[0.5] * 4))             # std 0: all zero
    groups.append(make_group(rng, n=4, vocab=VOCAB, token_advantages=True))        # used as sent
    groups[1]["overrides"] = [None, {"set_advantage_to_zero": True}, {}, None]
    groups[2]["group_overrides"] = {"set_advantage_to_zero": True}
    groups[3]["masks"][0][0] = groups[3]["tokens"][0][0]                           # token 0: not trainable
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, max_tokens_per_micro_batch=overrides.pop(
        "max_tokens_per_micro_batch", 32), **overrides)
    groups = groups_from_json_bytes(groups_to_json_bytes(groups))                   # as received
    tb = build_train_batch(groups, cfg)
    assert tb.metrics["data/dropped"] == 0 and tb.num_groups == len(groups)
    check_against_reference(tb, groups, cfg)
    seqs_of_zeroed = [4 + 1] + list(range(8, 12))
    for mb in tb.micro_batches:
        for k in seqs_of_zeroed:
            assert (mb.advantages[mb.sequence_ids == k] == 0).all()
    budget = cfg.max_tokens_per_micro_batch
    for mb in tb.micro_batches:
        cost = mb.input_ids.numel()
        assert cost <= budget or mb.num_sequences == 1


def test_packed_cu_seqlens_are_what_flash_attention_derives():
    """`cu_seqlens`/`max_seqlen` of a packed micro-batch equal what transformers' flash-attention
    path would derive from its position ids; `varlen_kwargs` hands them over only under flash."""
    from types import SimpleNamespace

    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from atropos_core.loss import varlen_kwargs

    rng = random.Random(11)
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, layout="packed", max_tokens_per_micro_batch=40)
    tb = build_train_batch([make_group(rng, n=4, vocab=VOCAB) for _ in range(3)], cfg)
    assert len(tb.micro_batches) > 1 and max(mb.num_sequences for mb in tb.micro_batches) > 1
    flash, sdpa = (SimpleNamespace(config=SimpleNamespace(_attn_implementation=a)) for a in ("flash_attention_2", "sdpa"))
    for mb in tb.micro_batches:
        (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(mb.position_ids)
        assert torch.equal(mb.cu_seqlens, cu_q) and torch.equal(cu_q, cu_k)
        assert mb.max_seqlen == int(max_q)
        kw = varlen_kwargs(flash, mb)
        assert torch.equal(kw["cu_seq_lens_q"], cu_q) and torch.equal(kw["cu_seq_lens_k"], cu_q)
        assert kw["max_length_q"] == kw["max_length_k"] == int(max_q)
        assert varlen_kwargs(sdpa, mb) == {}
    padded = build_train_batch([make_group(rng, n=4, vocab=VOCAB)], DataConfig(max_token_len=64, vocab_size=VOCAB))
    assert varlen_kwargs(flash, padded.micro_batches[0]) == {}


def test_varlen_kwargs_never_read_max_seqlen_off_the_device():
    """A packed micro-batch built without `max_seqlen` beside a CPU `cu_seqlens` gets it at
    construction; moved to a device (meta: reading any value back raises, where a real device would
    sync the host) `varlen_kwargs` still hands over the boundaries. One built on a device without it
    is a clear error, not a hidden sync per micro-batch."""
    import dataclasses
    from types import SimpleNamespace

    from atropos_core.loss import varlen_kwargs

    rng = random.Random(12)
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, layout="packed", max_tokens_per_micro_batch=200)
    mb = build_train_batch([make_group(rng, n=4, vocab=VOCAB) for _ in range(2)], cfg).micro_batches[0]
    assert mb.num_sequences > 1
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    longest = int(mb.cu_seqlens.diff().max())
    hand_built = dataclasses.replace(mb, max_seqlen=0)
    assert hand_built.max_seqlen == longest
    kw = varlen_kwargs(flash, hand_built.to("meta"))
    assert kw["max_length_q"] == kw["max_length_k"] == longest and kw["cu_seq_lens_q"].is_meta
    with pytest.raises(ValueError, match="needs max_seqlen"):
        varlen_kwargs(flash, dataclasses.replace(mb.to("meta"), max_seqlen=0))


def test_plan_respects_budget_and_balances():
    rng = random.Random(3)
    for padded in (True, False):
        for _ in range(20):
            lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
            budget = rng.choice([16, 64, 200])
            plan = plan_micro_batches(lengths, budget, padded)
            assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
            for b in plan:
                cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
                assert cost <= budget or len(b) == 1, (b, cost, budget)
            assert plan == plan_micro_batches(lengths, budget, padded)  # deterministic
    # balanced where a perfect split exists: 8×10 + 4×20 tokens into 40-token micro-batches
    plan = plan_micro_batches([10] * 8 + [20] * 4, 40, padded=False)
    assert len(plan) == 4 and all(sum(([10] * 8 + [20] * 4)[i] for i in b) == 40 for b in plan)
    # padded cost is rows × longest: long rows go together, short rows together
    plan = plan_micro_batches([4, 2, 4, 2, 4, 2, 4, 2], 8, padded=True)
    assert sorted(sorted(b) for b in plan) == [[0, 2], [1, 3, 5, 7], [4, 6]]


def _content(mb) -> tuple:
    """A micro-batch as plain values (the sequences it holds and its tokens), comparable across copies."""
    return (tuple(mb.sequence_ids.flatten().tolist()), tuple(mb.input_ids.flatten().tolist()), mb.num_sequences)


def test_split_for_ranks_equal_counts_and_balance():
    groups = good_groups(4, k=6, max_completion=12)
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, max_tokens_per_micro_batch=24,
                     use_inference_logprobs=True)
    mbs = build_train_batch(groups, cfg).micro_batches
    assert len(mbs) >= 5
    for world in (1, 2, 3, len(mbs) + 2):
        split = split_for_ranks(mbs, world)
        assert len(split) == world
        assert len({len(s) for s in split}) == 1 and len(split[0]) == math.ceil(len(mbs) / world)
        real = [mb for s in split for mb in s if mb.num_sequences > 0]
        assert sorted(map(id, real)) == sorted(map(id, mbs))
        for s in split:
            for mb in s:
                if mb.num_sequences == 0:  # the padding micro-batch: runs, trains nothing
                    assert mb.input_ids.shape == (1, 1) and mb.num_trained_tokens == 0
                    assert mb.attention_mask.sum() == 1 and mb.old_logprobs is not None
        loads = [sum(mb.input_ids.numel() for mb in s if mb.num_sequences) for s in split]
        if world <= len(mbs):
            assert max(loads) - min(loads) <= max(mb.input_ids.numel() for mb in mbs)
    # deterministic: another rank builds its own copy of the batch from the same groups and must
    # take the same share (compared by content: the old `split(mbs) == split(mbs)` compared the
    # same objects with themselves and could not fail)
    other = build_train_batch(copy.deepcopy(groups), cfg).micro_batches
    for world in (2, 3):
        mine, theirs = split_for_ranks(mbs, world), split_for_ranks(other, world)
        assert [[_content(mb) for mb in s] for s in mine] == [[_content(mb) for mb in s] for s in theirs]
        assert [[_content(mb) for mb in s] for s in mine] != [[_content(mb) for mb in s] for s in mine[::-1]]


def test_one_empty_micro_batch_pads_ranks_in_data_and_trainer():
    """`split_for_ranks`'s filler mirrors its batch's layout and optional fields; the trainer's
    (`empty_micro_batch()`: a rank may have nothing to mirror) is padded with none. Both come from
    `types.empty_micro_batch`: one attended token, nothing trained."""
    from atropos_core.trainer import empty_micro_batch

    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, layout="packed", use_inference_logprobs=True,
                     use_ref_logprobs=True)
    mbs = build_train_batch(good_groups(6, k=1), cfg).micro_batches
    filler, plain = split_for_ranks(mbs, len(mbs) + 1, pad_token_id=7)[-1][-1], empty_micro_batch()
    assert filler.layout == "packed" and filler.cu_seqlens.tolist() == [0, 1] and filler.max_seqlen == 1
    assert int(filler.input_ids) == 7 and filler.ref_logprobs is not None and filler.behaviour_mask is not None
    assert plain.layout == "padded" and plain.cu_seqlens is None and plain.ref_logprobs is plain.old_logprobs is None
    for mb in (filler, plain):
        assert mb.input_ids.shape == (1, 1) and mb.num_trained_tokens == 0 and mb.num_tokens == 1
        assert mb.num_sequences == 0 and int(mb.sequence_ids) == -1

def test_json_and_tensor_round_trip_keep_nan():
    groups = good_groups(5, k=2)
    groups[0]["scores"][0] = float("nan")
    groups[1]["advantages"] = [[float("inf")] * len(t) for t in groups[1]["tokens"]]
    t = groups_to_tensor(groups)
    assert t.dtype == torch.uint8 and t.dim() == 1
    back = groups_from_tensor(t)
    assert math.isnan(back[0]["scores"][0]) and back[1]["advantages"][0][0] == float("inf")
    assert back[0]["tokens"] == groups[0]["tokens"]
    with pytest.raises(ValueError, match="JSON list"):
        groups_from_json_bytes(b'{"batch": 1}')


def _broadcast_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from atropos_core.data import broadcast_groups

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        groups = good_groups(6, k=3) if rank == 0 else None
        got = broadcast_groups(groups, src=0)
        raw = json.dumps({"batch": good_groups(7, k=2)}).encode() if rank == 0 else None  # a /batch body
        got_raw = broadcast_groups(src=0, raw=raw)
        # every rank builds the whole batch from what rank 0 sent: batch whitening is global
        union = good_groups(8, k=2) + good_groups(9, k=3) if rank == 0 else None
        cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, advantage_norm="batch")
        tb = build_train_batch(broadcast_groups(union, src=0), cfg)
        advs = {}
        for mb in tb.micro_batches:
            for k in set(mb.sequence_ids.flatten().tolist()) - {-1}:
                advs[k] = mb.advantages[mb.sequence_ids == k].tolist()
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump([got, got_raw, [advs[k] for k in sorted(advs)]], f)
    finally:
        dist.destroy_process_group()


def test_broadcast_groups_and_batch_norm_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imports (spawn re-imports torch: ~10 s on 2 busy cores)
    mp.start_processes(_broadcast_worker, args=(str(tmp_path / "init"), str(tmp_path / "got.json")), nprocs=2,
                       join=True, start_method="fork")
    results = [json.loads((tmp_path / f"got.json.{rank}").read_text()) for rank in (0, 1)]
    for got, got_raw, _ in results:
        assert got == good_groups(6, k=3) and got_raw == good_groups(7, k=2)
    # each rank's advantages == batch normalisation of the union on one process
    union = build_train_batch(good_groups(8, k=2) + good_groups(9, k=3),
                              DataConfig(max_token_len=64, vocab_size=VOCAB, advantage_norm="batch"))
    expected = {}
    for mb in union.micro_batches:
        for k in set(mb.sequence_ids.flatten().tolist()) - {-1}:
            expected[k] = mb.advantages[mb.sequence_ids == k]
    for _, _, per_rank in results:
        assert len(per_rank) == len(expected) == 4 * 5
        for k, adv in enumerate(per_rank):
            torch.testing.assert_close(torch.tensor(adv), expected[k], rtol=1e-6, atol=1e-6)
        assert any(abs(a) > 0 for adv in per_rank for a in adv)


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(advantage_scale="rank"), "advantage_scale"), (dict(advantage_norm="all"), "advantage_norm"),
    (dict(advantage_clip=(1.0, -1.0)), "advantage_clip"), (dict(layout="rows"), "layout"),
    (dict(max_tokens_per_micro_batch=0), "max_tokens_per_micro_batch"), (dict(vocab_size=0), "vocab_size"),
    (dict(max_token_len=1), "max_token_len"), (dict(pad_token_id=60, vocab_size=50), "pad_token_id"),
])
def test_data_config_validation(bad, match):
    with pytest.raises(ValueError, match=f"data.{match}"):
        DataConfig(**bad)


# ---- bad input through the real API: each dropped and counted, batch-mates kept -----------------

def _bad(kind: str, rng) -> list[dict]:
    """The bad group(s) of one kind, built from a good one (4 sequences each)."""
    g = make_group(rng, n=4, vocab=VOCAB)
    if kind == "count_mismatch":
        g["masks"] = g["masks"][:3]
    elif kind == "length_mismatch":
        g["masks"][2] = g["masks"][2][:-1]
    elif kind == "length_mismatch_logprobs":
        g["inference_logprobs"][1] = g["inference_logprobs"][1] + [-0.5]
    elif kind == "too_long":
        g["tokens"][0] = g["tokens"][0] + [7] * 64
        g["masks"][0] = g["masks"][0] + [7] * 64
        g["inference_logprobs"][0] = g["inference_logprobs"][0] + [-0.5] * 64
        g["ref_logprobs"][0] = g["ref_logprobs"][0] + [-0.5] * 64
    elif kind == "token_out_of_range":
        g["tokens"][3][-1] = g["masks"][3][-1] = VOCAB
    elif kind == "negative_token":
        g["tokens"][3][0] = -5
    elif kind == "bad_mask":
        g["masks"][1][-1] = g["tokens"][1][-1] + 1
    elif kind == "bad_mask_shifted":  # masks written for the shifted convention: one position off
        g["masks"][0] = g["masks"][0][1:] + [-100]
    elif kind == "empty_sequence":
        g["tokens"][2] = []
        g["masks"][2] = []
        g["inference_logprobs"][2] = []
        g["ref_logprobs"][2] = []
    elif kind == "no_trained_tokens":
        g["masks"] = [[-100] * len(t) for t in g["tokens"]]
    elif kind == "bad_logprobs":
        g["inference_logprobs"][0][-1] = 1.0
    elif kind == "duplicate":
        return [g, copy.deepcopy(g)]
    elif kind == "several_mb":
        g["tokens"] = [list(range(1, VOCAB)) * 2000 for _ in range(4)]  # 98k tokens each: ~3 MB JSON
        g["masks"] = [list(t) for t in g["tokens"]]
        g["inference_logprobs"] = g["ref_logprobs"] = None
    else:
        raise AssertionError(kind)
    return [g]


BAD_KINDS = {
    "count_mismatch": "count_mismatch", "length_mismatch": "length_mismatch",
    "length_mismatch_logprobs": "length_mismatch", "too_long": "too_long",
    "token_out_of_range": "token_out_of_range", "negative_token": "token_out_of_range",
    "bad_mask": "bad_mask", "bad_mask_shifted": "bad_mask", "empty_sequence": "empty_sequence",
    "no_trained_tokens": "no_trained_tokens", "bad_logprobs": "bad_logprobs", "duplicate": "duplicate",
    "several_mb": "too_long",
}


@pytest.mark.api
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_group_from_api_dropped_and_counted(atropos_api, kind):
    rng = random.Random(list(BAD_KINDS).index(kind))
    bad = _bad(kind, rng)
    good = [make_group(rng, n=4, vocab=VOCAB) for _ in range(4 - len(bad))]
    if kind == "several_mb":
        assert len(json.dumps(bad)) > 2_500_000
    posted = good[:1] + bad + good[1:]   # the bad group(s) in the middle of the batch
    batch = post_and_fetch(atropos_api.url, posted)
    assert len(batch) == 4
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, max_tokens_per_micro_batch=40,
                     use_inference_logprobs=kind != "several_mb")
    ok = [validate_group(g, cfg) for g in batch]
    expect = BAD_KINDS[kind]
    if kind != "duplicate":
        assert [reason_key(r) for good_, r in ok if not good_] == [expect]
    tb = build_train_batch(batch, cfg)
    assert tb.metrics["data/dropped"] == 1
    assert tb.metrics[f"data/dropped/{expect}"] == 1
    assert expect in DROP_REASONS
    assert tb.num_groups == len(batch) - 1
    kept = []  # what should survive, in batch order: the good groups, and a duplicate's first copy
    for g in batch:
        if kind == "duplicate" and g not in kept or any(g["tokens"] == k["tokens"] for k in good):
            kept.append(g)
    assert len(kept) == tb.num_groups
    check_against_reference(tb, kept, cfg)


# ---- faults the server cannot carry: injected into a fetched batch ------------------------------

INJECTED = {
    "nan_score": (lambda g: g["scores"].__setitem__(1, float("nan")), "non_finite"),
    "inf_advantages": (lambda g: g.__setitem__("advantages", [[0.0] * (len(t) - 1) + [float("inf")]
                                                              for t in g["tokens"]]), "non_finite"),
    "nan_inference_logprobs": (lambda g: g["inference_logprobs"][2].__setitem__(-1, float("nan")), "non_finite"),
    "neg_inf_ref_logprobs": (lambda g: g["ref_logprobs"][0].__setitem__(-1, float("-inf")), "non_finite"),
    "string_tokens": (lambda g: g["tokens"].__setitem__(0, [str(x) for x in g["tokens"][0]]), "malformed"),
    "float_tokens": (lambda g: g["tokens"][1].__setitem__(0, 1.5), "malformed"),
    "nested_tokens": (lambda g: g["tokens"].__setitem__(0, [g["tokens"][0]]), "malformed"),
    "null_masks": (lambda g: g.__setitem__("masks", None), "malformed"),
    "not_a_dict": (None, "malformed"),
    "no_logprobs": (lambda g: g.__setitem__("inference_logprobs", None), "missing_logprobs"),
}


@pytest.mark.api
def test_injected_faults_dropped_and_counted(atropos_api):
    """NaN/Infinity (in JSON text too: the server loses such batches with a 500, so they can only
    come from elsewhere, e.g. another rank) and wrong JSON types are dropped per group."""
    rng = random.Random(7)
    fetched = post_and_fetch(atropos_api.url, [make_group(rng, n=4, vocab=VOCAB) for _ in range(4)])
    cfg = DataConfig(max_token_len=64, vocab_size=VOCAB, use_inference_logprobs=True, use_ref_logprobs=True)
    for name, (inject, reason) in INJECTED.items():
        batch = copy.deepcopy(fetched)
        if inject is None:
            batch[1] = ["not", "a", "group"]
        else:
            inject(batch[1])
        batch = groups_from_json_bytes(groups_to_json_bytes(batch))  # NaN/Infinity as JSON text
        ok, why = validate_group(batch[1], cfg)
        assert not ok and reason_key(why) == reason, (name, why)
        tb = build_train_batch(batch, cfg)
        assert tb.metrics["data/dropped"] == 1 and tb.metrics[f"data/dropped/{reason}"] == 1, name
        check_against_reference(tb, [batch[0], batch[2], batch[3]], cfg)
    # and all of them at once: each counted under its reason
    batch = [copy.deepcopy(fetched[0]) for _ in INJECTED] + copy.deepcopy(fetched[1:])
    for g, (inject, _) in zip(batch, INJECTED.values()):
        g["scores"][0] += rng.random()  # not duplicates of each other
        inject(g) if inject else None
    batch[list(INJECTED).index("not_a_dict")] = 42
    tb = build_train_batch(batch, cfg)
    want = {}
    for _, reason in INJECTED.values():
        want[reason] = want.get(reason, 0) + 1
    assert tb.metrics["data/dropped"] == len(INJECTED)
    assert {k[len("data/dropped/"):]: v for k, v in tb.metrics.items() if k.startswith("data/dropped/")} == want
    check_against_reference(tb, fetched[1:], cfg)


def test_all_dropped_gives_empty_batch_and_one_log_line(caplog):
    g = good_groups(8, k=1)[0]
    g["masks"] = [[-100] * len(t) for t in g["tokens"]]
    g["env_id"] = 3
    with caplog.at_level(logging.WARNING, logger="atropos_core.data"):
        tb = build_train_batch([g], DataConfig(vocab_size=VOCAB))
        assert tb.micro_batches == [] and tb.total_trained_tokens == 0 and tb.num_groups == 0
        assert tb.metrics["data/dropped/no_trained_tokens"] == 1
        assert [r.getMessage() for r in caplog.records] == [
            "dropping group 0 of the batch (env_id=3): no_trained_tokens: sequence 0 has no trained position "
            "after the first token"]
        build_train_batch([g], DataConfig(vocab_size=VOCAB), log_drops=False)  # other ranks: quiet
        assert len(caplog.records) == 1


def test_duplicate_groups_dropped_but_their_scores_reported():
    """A converged policy samples identical groups for real: the copy is not trained twice, but its
    scores stay visible to the reward statistics (`data/duplicate_*`)."""
    rng = random.Random(7)
    a, b = make_group(rng), make_group(rng)
    batch = build_train_batch([a, copy.deepcopy(a), b, copy.deepcopy(a)], DataConfig(vocab_size=50))
    assert batch.num_groups == 2 and batch.metrics["data/dropped/duplicate"] == 2
    assert batch.metrics["data/duplicate_sequences"] == 2 * len(a["scores"])
    assert batch.metrics["data/duplicate_score_sum"] == pytest.approx(2 * sum(a["scores"]))
    assert sorted(batch.scores) == sorted(a["scores"] + b["scores"])


def test_repeated_groups_are_said_once_not_warned_per_group(caplog, monkeypatch):
    """Late in a run most groups of a converged policy repeat: one info line per process, no
    warning per group (the demo printed 466 of them), while bad data is still warned about."""
    import atropos_core.data.validate as validate

    monkeypatch.setattr(validate, "_duplicates_noted", False)
    rng = random.Random(8)
    a = make_group(rng)
    bad = dict(make_group(rng), scores=[math.nan] * len(a["scores"]))
    with caplog.at_level(logging.DEBUG, logger="atropos_core.data.validate"):
        for _ in range(3):
            build_train_batch([a, copy.deepcopy(a), copy.deepcopy(a), bad], DataConfig(vocab_size=50))
    said = [r for r in caplog.records if "repeats an earlier one" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO] + [logging.DEBUG] * 5
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 3  # the bad group, each batch
