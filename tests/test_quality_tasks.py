"""The FP8 quality runs' word chain (bench/quality_tasks.py): every word one token, and the
walks follow the chain's table with its weights, so its entropy is the loss floor the
results quote. Counted from the written text, not from the generator's own state."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality_tasks as qt  # after the path insert

pytestmark = pytest.mark.timeout(120)


def test_every_chain_word_is_one_token_of_the_bundled_tokenizer(tmp_path):
    from ray_app.data.tokenize import load_tokenizer

    qt.write_word_chain(tmp_path / "w.jsonl", records=4, seed=3)
    tokenizer = load_tokenizer(str(qt.gt.TOKENIZER))
    for line in (tmp_path / "w.jsonl").read_text().splitlines():
        words = json.loads(line)["text"].split(" ")
        assert 300 <= len(words) <= 900
        ids = tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"]
        assert len(ids) == len(words)


def test_the_walks_follow_the_table_with_zipf_weights_and_differ_between_tables(tmp_path):
    qt.write_word_chain(tmp_path / "a.jsonl", records=40, seed=0, table=qt.TRAIN_CHAIN)
    qt.write_word_chain(tmp_path / "b.jsonl", records=4, seed=0, table=qt.BASE_CHAIN)
    pairs: dict[str, Counter] = {}
    for line in (tmp_path / "a.jsonl").read_text().splitlines():
        words = json.loads(line)["text"].split(" ")
        for a, b in itertools.pairwise(words):
            pairs.setdefault(a, Counter())[b] += 1
    assert all(len(followers) <= qt.CHAIN_SUCCESSORS for followers in pairs.values())
    # Ranked by count, pooled over words: the shares approach 1/k over the harmonic sum.
    pooled = [0] * qt.CHAIN_SUCCESSORS
    for followers in pairs.values():
        for rank, (_, n) in enumerate(followers.most_common()):
            pooled[rank] += n
    shares = [n / sum(pooled) for n in pooled]
    harmonic = sum(1 / (i + 1) for i in range(qt.CHAIN_SUCCESSORS))
    for rank, share in enumerate(shares):
        assert share == pytest.approx(1 / (rank + 1) / harmonic, abs=0.03)
    entropy = -sum(p * math.log(p) for p in shares)
    assert entropy == pytest.approx(qt.chain_entropy(), abs=0.05)
    # The base's table is another: its walks use transitions the LoRA runs' table lacks.
    other = [json.loads(line)["text"].split(" ")
             for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    unseen = sum(b not in pairs.get(a, {}) for words in other for a, b in itertools.pairwise(words))
    assert unseen > 0.5 * sum(len(words) - 1 for words in other)


def test_the_quality_summary_pairs_each_run_with_bf16_of_its_own_seed_and_file():
    import gpu_fp8

    def run(precision, seed, loss):
        return {"precision": precision, "seed": seed, "eval_loss_final": loss}

    runs = {"a/ray_app_default": run("default", 42, 2.0),
            "a/ray_app_fp8": run("fp8", 42, 2.1),
            "a/ray_app_fp8_exact_accum": run("fp8_exact_accum", 42, 1.9),
            "b/ray_app_default_s7": run("default", 7, 3.0),
            "b/ray_app_fp8_s7": run("fp8", 7, 2.7),
            # Seed 42 has a bf16 run only in file a (another base): unpaired, as is seed 9.
            "b/ray_app_fp8_exact_accum": run("fp8_exact_accum", 42, 4.0),
            "b/ray_app_fp8_s9": run("fp8", 9, 5.0),
            "b/plain_loop_fp8": {"eval_loss_final": 9.0}}  # not a quality run
    summary = gpu_fp8.quality_summary(runs)
    assert summary["mean"]["default"] == pytest.approx(2.5)
    assert summary["mean"]["fp8"] == pytest.approx((2.1 + 2.7 + 5.0) / 3)
    assert summary["bf16_spread"] == pytest.approx(0.5)
    assert summary["vs_bf16_same_seed"] == {
        "fp8": {"a seed 42": pytest.approx(0.05), "b seed 7": pytest.approx(-0.1)},
        "fp8_exact_accum": {"a seed 42": pytest.approx(-0.05)}}
