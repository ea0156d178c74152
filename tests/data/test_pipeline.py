"""The Grain pipeline: batch layout, seeds, sharding, packing, eval coverage, exact restore."""

import numpy as np
import pytest

from tinystories_jax.data import pipeline
from tinystories_jax.data import preparation
from tinystories_jax.data.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipe") / "data"
  preparation.prepare(preparation.PrepareOptions(
      inputs="synthetic", output_dir=str(out), vocab_size=512, synthetic_stories=800,
      num_workers=1, valid_fraction=0.05))
  return out


def _ds(data_dir, **kw):
  args = dict(batch_size=4, seq_len=32, seed=1, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.train_dataset(data_dir, **args)


def test_windows(data_dir):
  ds = _ds(data_dir)
  tokens = pipeline.PreparedData.load(data_dir).tokens("train")
  b = ds[3]
  assert b["inputs"].shape == b["targets"].shape == b["loss_mask"].shape == (4, 32)
  assert b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  # Every row is a real slice of the token file.
  flat = np.asarray(tokens).astype(np.int32)
  for row in np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1):
    starts = np.flatnonzero(flat[:-33] == row[0])
    assert any((flat[s:s + 33] == row).all() for s in starts)
  assert not np.array_equal(ds[0]["inputs"], ds[1]["inputs"])


def test_seed_and_epochs(data_dir):
  a, b, c = _ds(data_dir, seed=1), _ds(data_dir, seed=1), _ds(data_dir, seed=2)
  np.testing.assert_array_equal(a[5]["inputs"], b[5]["inputs"])
  assert not np.array_equal(a[5]["inputs"], c[5]["inputs"])
  per_epoch = len(a) // (1 << 20)
  # The next epoch is a new shuffle, not a replay.
  assert not np.array_equal(a[0]["inputs"], a[per_epoch]["inputs"])


def test_shards_split_the_global_batch(data_dir):
  whole = _ds(data_dir, batch_size=6, shard_count=1)
  parts = [_ds(data_dir, batch_size=2, shard_index=i, shard_count=3) for i in range(3)]
  for step in (0, 7):
    np.testing.assert_array_equal(
        whole[step]["inputs"], np.concatenate([p[step]["inputs"] for p in parts]))


def test_packed(data_dir):
  data = pipeline.PreparedData.load(data_dir)
  tokens, offsets = np.asarray(data.tokens("train")), data.offsets("train")
  stories = {tuple(tokens[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)}
  bos, eos = data.metadata["bos_id"], data.metadata["eos_id"]
  b = _ds(data_dir, packed=True, seq_len=100)[2]
  assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
  for r in range(4):
    seg, pos, mask = b["segment_ids"][r], b["positions"][r], b["loss_mask"][r]
    row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
    for s in set(seg.tolist()) - {0}:
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))
      piece = row[where[0]:where[-1] + 2] if where[-1] + 1 < 100 else row[where[0]:]
      piece = tuple(piece[: np.flatnonzero(piece == eos)[0] + 1]) if eos in piece else tuple(piece)
      if piece[0] == bos and piece[-1] == eos:
        assert piece in stories
    # No loss on padding or from the last token of one story to the first of the next.
    boundary = (seg[1:] != seg[:-1]) | (seg[1:] == 0)
    assert (mask[:-1][boundary] == 0).all()
    assert (mask[seg == 0] == 0).all()
    assert mask.sum() > 0


def test_restore_after_k_batches(data_dir):
  ds = _ds(data_dir)
  it = pipeline.make_iterator(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(4)]
  it2 = pipeline.make_iterator(_ds(data_dir))
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_worker_prefetch_matches_in_process(data_dir):
  ds = _ds(data_dir, packed=True)
  plain = pipeline.make_iterator(ds)
  expected = [next(plain)["inputs"] for _ in range(6)]
  it = pipeline.make_iterator(ds, worker_count=2)
  got = [next(it)["inputs"] for _ in range(3)]
  state = it.get_state()
  it2 = pipeline.make_iterator(_ds(data_dir, packed=True), worker_count=2)
  it2.set_state(state)
  got += [next(it2)["inputs"] for _ in range(3)]
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g, e)


def test_eval_batches_cover_the_split_once(data_dir):
  data = pipeline.PreparedData.load(data_dir)
  tokens = np.asarray(data.tokens("valid")).astype(np.int32)
  batches = list(pipeline.eval_batches(data_dir, batch_size=3, seq_len=50, shard_index=0,
                                       shard_count=1))
  targets = np.concatenate([b["targets"].reshape(-1)[b["loss_mask"].reshape(-1) > 0]
                            for b in batches])
  np.testing.assert_array_equal(targets, tokens[1:])
  halves = [list(pipeline.eval_batches(data_dir, batch_size=2, seq_len=50, shard_index=i,
                                       shard_count=2)) for i in range(2)]
  assert len(halves[0]) == len(halves[1])
  masked = sum(b["loss_mask"].sum() for h in halves for b in h)
  assert masked == len(tokens) - 1


def test_bits_per_byte():
  assert pipeline.bits_per_byte(np.log(2) * 100, {"text_bytes": 50}) == pytest.approx(2.0)


def test_errors(tmp_path, data_dir):
  with pytest.raises(DataError, match="not a prepared data directory"):
    pipeline.train_dataset(tmp_path, batch_size=2, seq_len=8, seed=0, shard_index=0,
                           shard_count=1)
  with pytest.raises(DataError, match="fewer than one global batch"):
    _ds(data_dir, split="valid", batch_size=512, seq_len=512)
  with pytest.raises(DataError, match="no split 'test'"):
    _ds(data_dir, split="test")
