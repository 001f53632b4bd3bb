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
