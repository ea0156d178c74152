"""Block classification of the flash kernels against a brute-force mask."""

import itertools

import numpy as np
import pytest

from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels.attention_reference import attention_mask


def _brute_mask(t, s, causal, window, t_pad, s_pad):
  mask = np.zeros((t_pad, s_pad), dtype=bool)
  mask[:t, :s] = np.asarray(attention_mask(t, s, causal=causal, window=window)[0])
  # Padded query rows keep their positions (they are computed and sliced off later).
  for r in range(t, t_pad):
    pos = r + s - t
    for j in range(s):
      mask[r, j] = (not causal or j <= pos) and (window is None or j > pos - window)
  return mask


CASES = [  # (t, s, block_q, block_k, causal, window)
    (128, 128, 32, 32, True, None),
    (100, 100, 32, 16, True, 40),
    (130, 130, 64, 32, False, None),
    (96, 160, 32, 32, True, 50),   # queries are the last 96 of 160 positions
    (160, 96, 16, 32, True, None),  # more queries than keys: the first rows see nothing
    (300, 300, 64, 64, True, 256),
]


@pytest.mark.parametrize("t,s,bq,bk,causal,window", CASES)
def test_block_ranges_match_the_mask(t, s, bq, bk, causal, window):
  t_pad, s_pad = -(-t // bq) * bq, -(-s // bk) * bk
  mask = _brute_mask(t, s, causal, window, t_pad, s_pad)
  kw = dict(block_q=bq, block_k=bk, kv_len=s, causal=causal, window=window, has_segments=False,
            q_offset=s - t)
  for i, j in itertools.product(range(t_pad // bq), range(s_pad // bk)):
    tile = mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
    lo, full_lo, full_hi, hi = (int(x) for x in flash_tiling.kv_block_range(i * bq, **kw))
    assert lo <= full_lo <= full_hi <= hi
    in_range, full = lo <= j < hi, full_lo <= j < full_hi
    assert in_range or not tile.any(), (i, j, "a visible pair was skipped")
    assert not full or tile.all(), (i, j, "a block with masked pairs was treated as full")
    lo, full_lo, full_hi, hi = (int(x) for x in flash_tiling.q_block_range(
        j * bk, num_q_blocks=t_pad // bq, **kw))
    real_rows = tile[:max(0, t - i * bq)]  # padded query rows carry zero inputs and cotangents
    in_range_t, full_t = lo <= i < hi, full_lo <= i < full_hi
    assert in_range_t or not real_rows.any(), (i, j, "dK/dV skipped a visible pair")
    assert not full_t or real_rows.all(), (i, j, "dK/dV treated a masked block as full")


def test_window_256_skips_most_blocks_at_2048():
  kw = dict(block_q=64, block_k=64, kv_len=2048, causal=True, has_segments=False)
  def visited(window):
    return sum(int(hi) - int(lo) for lo, _, _, hi in (
        flash_tiling.kv_block_range(i * 64, window=window, **kw) for i in range(32)))
  causal, windowed = visited(None), visited(256)
  assert causal == 32 * 33 // 2
  assert windowed <= 32 * 5 and windowed < causal / 3


def test_segments_make_every_visited_block_partial():
  lo, full_lo, full_hi, hi = (int(x) for x in flash_tiling.kv_block_range(
      128, block_q=32, block_k=32, kv_len=256, causal=True, window=None, has_segments=True))
  assert (lo, hi) == (0, 5) and full_lo == full_hi == hi


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="power of two"):
    flash_tiling.BlockSizes(block_q=48)


def test_block_sizes_check_the_gpu_compiler_settings():
  bs = flash_tiling.BlockSizes(num_warps=8, num_stages=4)
  assert "num_warps" not in bs.names() and len(bs.names()) == 6
  with pytest.raises(ValueError, match="num_warps"):
    flash_tiling.BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match="num_stages"):
    flash_tiling.BlockSizes(num_stages=0)


def test_visible_pairs_counts_the_mask():
  for t, s, causal, window in [(10, 10, True, None), (10, 10, True, 3), (4, 9, True, 2),
                               (5, 7, False, None)]:
    expected = int(np.asarray(attention_mask(t, s, causal=causal, window=window)).sum())
    assert flash_tiling.visible_pairs(t, s, causal=causal, window=window) == expected


def test_segment_spans_ignore_padding_and_detect_disjoint_stories():
  q_ids = np.array([3, 3, 4, flash_tiling.Q_PAD_ID], np.int32)
  span = tuple(int(x) for x in flash_tiling.segment_span(q_ids, flash_tiling.Q_PAD_ID))
  assert span == (3, 4)
  pad_only = flash_tiling.segment_span(np.full(4, flash_tiling.KV_PAD_ID, np.int32),
                                       flash_tiling.KV_PAD_ID)
  assert int(pad_only[1]) < int(pad_only[0])  # an empty span meets nothing
  assert not flash_tiling.spans_overlap(span, pad_only)
  assert not flash_tiling.spans_overlap(span, (1, 2))
  assert flash_tiling.spans_overlap(span, (4, 9))


def test_split_head_dim_widths():
  assert flash_tiling.split_head_dim_widths(48) == (32, 16)
  assert flash_tiling.split_head_dim_widths(40) == (32, 16)
  assert flash_tiling.split_head_dim_widths(112) == (64, 32, 16)
  for one_tile in (16, 20, 56, 64, 128):
    assert len(flash_tiling.split_head_dim_widths(one_tile)) == 1, one_tile
