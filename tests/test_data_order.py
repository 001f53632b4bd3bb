"""Per-rank sample order (a pure function of seed, epoch and world size), the resume
cursor, and packed batches that keep documents apart in the model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_app.data.collate import REAL_TOKENS, PackedCollate
from ray_app.data.order import TrainStream, cursor_after, index_chunks
from ray_app.data.pack import SEQUENCE_SCHEMA, best_fit_decreasing, pack_batch
from ray_app.data.tokenize import IGNORE

N = 103  # sequences; sample i has input_ids [i] so it can be recognised


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> TrainStream:
    folder = tmp_path_factory.mktemp("seqs")
    for part, ids in enumerate(np.array_split(np.arange(N), 3)):
        table = pa.table({"input_ids": [[int(i)] for i in ids], "labels": [[int(i)] for i in ids],
                          "position_ids": [[0] for _ in ids]})
        pq.write_table(table, folder / f"part{part}.parquet", row_group_size=10)
    return TrainStream(index_chunks(str(folder)))


def _ids(stream, **kw) -> list[int]:
    return [int(s["input_ids"][0]) for s in stream.samples(**kw)]


def test_index_accounts_for_every_sequence(stream):
    assert stream.num_samples == N and len(stream.chunks) == 12  # 10+10+10+5 per file x3


def test_order_is_a_pure_function_of_seed_epoch_and_world_size(stream):
    a = _ids(stream, epoch=1, seed=7, world_size=2, rank=1)
    assert a == _ids(stream, epoch=1, seed=7, world_size=2, rank=1)
    assert a != _ids(stream, epoch=2, seed=7, world_size=2, rank=1)
    assert a != _ids(stream, epoch=1, seed=8, world_size=2, rank=1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_equal_disjoint_shares_of_the_epoch(stream, world):
    shares = [_ids(stream, epoch=0, seed=1, world_size=world, rank=r) for r in range(world)]
    assert {len(s) for s in shares} == {N // world} == {stream.samples_per_rank(world)}
    seen = [i for s in shares for i in s]
    assert len(set(seen)) == len(seen) == (N // world) * world
    batches = [list(stream.batches(epoch=0, seed=1, world_size=world, rank=r, batch_size=8))
               for r in range(world)]
    assert {len(b) for b in batches} == {stream.batches_per_rank(world, 8)}


def test_resume_from_the_cursor_skips_exactly_the_trained_samples(stream):
    world, batch = 2, 4
    full = [_ids(stream, epoch=3, seed=5, world_size=world, rank=r) for r in range(world)]
    done = 5  # micro-batches every rank trained before the failure
    cursor = cursor_after(done, batch, world)
    for r in range(world):
        rest = _ids(stream, epoch=3, seed=5, world_size=world, rank=r, start_sample=cursor)
        assert rest == full[r][done * batch:]


def test_resume_with_another_world_size_trains_no_sample_twice(stream):
    trained = set()
    for r in range(2):  # 3 batches of 5 on each of 2 ranks
        trained |= set(_ids(stream, epoch=0, seed=9, world_size=2, rank=r)[:15])
    cursor = cursor_after(3, 5, 2)
    after = [i for r in range(3) for i in _ids(stream, epoch=0, seed=9, world_size=3, rank=r,
                                                  start_sample=cursor)]
    assert not trained & set(after)
    assert len(trained) + len(after) >= (N // 3) * 3 - 2  # at most world-1 skipped


def test_best_fit_decreasing_respects_capacity_and_uses_every_item():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, 500).tolist()
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert sum(lengths) / (64 * len(bins)) > 0.9


def test_pack_batch_drops_duplicates_and_repeats_weighted_sources():
    batch = {"origin": np.array([1, 2, 3]), "source_id": np.array([0, 0, 1]),
             "content_hash": np.array(["0" * 32] * 3),
             "input_ids": [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])],
             "labels": [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]}
    out = pack_batch(batch, max_seq_len=16, packing=True, weights={1: 2.0},
                     duplicates=np.array([2]))
    assert out.schema == SEQUENCE_SCHEMA and out.num_rows == 1
    row = out.to_pylist()[0]
    assert sorted(row["input_ids"]) == [5, 6, 8, 8, 9, 9, 10, 10]
    assert row["num_docs"] == 3 and row["position_ids"].count(0) == 3
    assert all(row["labels"][i] == IGNORE for i, p in enumerate(row["position_ids"]) if p == 0)


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn):
    model = _tiny_llama(attn)
    a, b = [3, 4, 5, 6, 7], [8, 9, 10]
    batch = {"input_ids": [np.array(a + b), np.array(b)], "labels": [np.array(a + b), np.array(b)],
             "position_ids": [np.array([0, 1, 2, 3, 4, 0, 1, 2]), np.array([0, 1, 2])]}
    inputs = PackedCollate(pad_id=0)(batch)
    assert int(inputs.pop(REAL_TOKENS)) == 11 and "attention_mask" not in inputs
    inputs.pop("labels")
    assert inputs["input_ids"].shape == (2, 8)
    assert inputs["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # padding continues
    with torch.no_grad():  # use_cache=False: with a cache transformers ignores packing
        packed = model(**inputs, use_cache=False).logits
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[0, :5], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 5:8], alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :3], alone_b, atol=1e-5, rtol=1e-4)


def test_padded_rows_of_one_document_each_need_no_attention_mask():
    from transformers.masking_utils import find_packed_sequence_indices

    rows = [np.array([3, 4, 5, 6, 7]), np.array([8, 9])]  # packing off, or DPO answers
    inputs = PackedCollate(pad_id=0)({"input_ids": rows, "labels": rows})
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    # transformers then builds no mask tensor: plain causal attention
    assert find_packed_sequence_indices(inputs["position_ids"]) is None
    model = _tiny_llama("sdpa")
    with torch.no_grad():
        padded = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       use_cache=False).logits
        alone = model(input_ids=torch.tensor([[8, 9]])).logits[0]
    torch.testing.assert_close(padded[1, :2], alone, atol=1e-5, rtol=1e-4)


def test_flattened_collate_is_one_padding_free_row():
    batch = {"input_ids": [np.array([1, 2, 3]), np.array([4, 5])],
             "labels": [np.array([IGNORE, 2, 3]), np.array([IGNORE, 5])]}
    out = PackedCollate(pad_id=0, flatten=True)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert int(out[REAL_TOKENS]) == 5
