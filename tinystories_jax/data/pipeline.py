"""Grain input pipeline: prepared token files -> batches of numpy arrays.

Each element of the Grain ``MapDataset`` is a whole batch, cut out of the memory-mapped token file
with one vectorised numpy gather: per-element Python in the hot path cannot keep a GPU fed (see
BUILD.md for the measured rates). Two layouts:

* **windows** (default): rows of ``seq_len + 1`` consecutive tokens of the concatenated split;
  ``inputs = row[:-1]``, ``targets = row[1:]``. Each epoch shuffles the windows and shifts their
  start by a random offset, so the model sees different cuts of the text.
* **packed**: whole stories (BOS ... EOS) placed greedily into rows, with ``segment_ids`` (1, 2, ...
  per story, 0 for padding) and ``positions`` restarting at 0 for each story; a story longer than a
  row is cut into row-sized pieces. The loss mask is zero on padding and across story boundaries.

The global batch of step ``i`` is the same whatever the number of processes: process ``p`` of
``P`` takes rows ``[p * B, (p + 1) * B)`` of it, where ``B`` is the per-process batch. Iterators are
checkpointable (``get_state`` / ``set_state``): restored after ``k`` batches, the next batches are
identical.

Batch layout: ``inputs`` int32 [B, T], ``targets`` int32 [B, T], ``loss_mask`` float32 [B, T];
packed batches add ``segment_ids`` int32 [B, T] and ``positions`` int32 [B, T].
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator

import grain
from absl import flags
import numpy as np

from tinystories_jax.data.errors import DataError

# A MapDataset needs a length; an "infinite" stream is this many epochs long.
_EPOCHS = 1 << 20


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A directory written by `prepare`."""

  dir: pathlib.Path
  metadata: dict

  @classmethod
  def load(cls, data_dir: str | pathlib.Path) -> "PreparedData":
    path = pathlib.Path(data_dir)
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
      raise DataError(f"{path} is not a prepared data directory (no metadata.json): run "
                      f"`python -m tinystories_jax.prepare --output_dir={path} ...` first.")
    try:
      metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise DataError(f"{meta_path} is unreadable ({e}): rerun prepare for {path}.") from e
    return cls(path, metadata)

  @property
  def tokenizer_path(self) -> pathlib.Path:
    return self.dir / self.metadata["tokenizer"]["file"]

  @property
  def vocab_size(self) -> int:
    return int(self.metadata["vocab_size"])

  def split(self, name: str) -> dict:
    splits = self.metadata["splits"]
    if name not in splits:
      raise DataError(f"{self.dir} has no split {name!r} (it has {', '.join(splits)}).")
    return splits[name]

  def tokens(self, name: str) -> np.ndarray:
    """The split's flat token array, memory-mapped read-only."""
    info = self.split(name)
    path = self.dir / info["tokens_file"]
    dtype = np.dtype(self.metadata["token_dtype"])
    expected = info["tokens"] * dtype.itemsize
    size = path.stat().st_size if path.is_file() else -1
    if size != expected:
      raise DataError(f"{path} holds {size} bytes but metadata.json says {expected}: the file is "
                      "damaged or from another run; rerun prepare with --overwrite.")
    if info["tokens"] == 0:
      return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")

  def offsets(self, name: str) -> np.ndarray:
    return np.load(self.dir / self.split(name)["offsets_file"])


def bits_per_byte(total_nll_nats: float, split_info: dict) -> float:
  """Converts a split's summed next-token loss (nats) into bits per byte of its text.

  Comparable across tokenizers: the same text costs the same bytes whatever the vocabulary.
  """
  return total_nll_nats / math.log(2) / max(1, split_info["text_bytes"])


def _default_shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard index {shard_index} is outside [0, {shard_count}).")
  return shard_index, shard_count


class _BatchSource:
  """Random access to batch ``i`` of an endless, per-epoch reshuffled stream (a Grain source)."""

  def __init__(self, data: PreparedData, split: str, batch_size: int, seq_len: int, seed: int,
               shard_index: int, shard_count: int):
    self.data_dir = data.dir
    self.split = split
    self.batch_size = batch_size
    self.global_batch = batch_size * shard_count
    self.shard_index = shard_index
    self.seq_len = seq_len
    self.seed = seed
    self._tokens = None  # opened lazily, so the source pickles cheaply into worker processes

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tokens"] = None
    state.pop("_epoch_cache", None)
    return state

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:
      self._tokens = PreparedData.load(self.data_dir).tokens(self.split)
    return self._tokens

  def __len__(self) -> int:
    return self.batches_per_epoch * _EPOCHS

  def _rng(self, epoch: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, epoch])

  def _rows(self, index: int) -> tuple[int, np.ndarray]:
    """The epoch of batch ``index`` and this process's row numbers within that epoch."""
    epoch, b = divmod(index, self.batches_per_epoch)
    start = b * self.global_batch + self.shard_index * self.batch_size
    return epoch, np.arange(start, start + self.batch_size)


class _WindowBatches(_BatchSource):
  """Batches of ``seq_len + 1``-token windows of the concatenated split."""

  def __init__(self, data: PreparedData, *args, **kwargs):
    super().__init__(data, *args, **kwargs)
    num_tokens = data.split(self.split)["tokens"]
    # One window fewer than fits, so that a random start offset in [0, seq_len) always fits.
    self.num_windows = max(0, (num_tokens - 1) // self.seq_len - 1)
    self.batches_per_epoch = self.num_windows // self.global_batch
    if self.batches_per_epoch == 0:
      raise DataError(
          f"the {self.split} split has {num_tokens} tokens, fewer than one global batch of "
          f"{self.global_batch} x {self.seq_len + 1}: lower the batch size or sequence length, or "
          "prepare more text.")
    self._epoch_cache: dict = {}

  def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
    cache = self.__dict__.setdefault("_epoch_cache", {})
    if epoch not in cache:
      rng = self._rng(epoch)
      cache.clear()
      cache[epoch] = (rng.permutation(self.num_windows), int(rng.integers(self.seq_len)))
    return cache[epoch]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, rows = self._rows(index)
    perm, offset = self._epoch(epoch)
    starts = perm[rows] * self.seq_len + offset
    window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
    return {"inputs": window[:, :-1], "targets": window[:, 1:],
            "loss_mask": np.ones((self.batch_size, self.seq_len), np.float32)}


class _PackedBatches(_BatchSource):
  """Batches of whole stories packed into rows, with segment ids and positions."""

  def __init__(self, data: PreparedData, *args, pad_id: int, **kwargs):
    super().__init__(data, *args, **kwargs)
    self.pad_id = pad_id
    self.offsets = data.offsets(self.split)
    if len(self.offsets) < 2:
      raise DataError(f"the {self.split} split has no stories: prepare more text.")
    # The packing of epoch 0 tells how many rows an epoch has; later epochs differ by a few rows,
    # so an epoch is cut to the smallest count that every epoch surely reaches.
    row_len = self.seq_len + 1
    total = int(self.offsets[-1])
    # No packing has fewer rows than the tokens fill when every row is full.
    self.batches_per_epoch = total // row_len // self.global_batch
    if self.batches_per_epoch == 0:
      raise DataError(
          f"the {self.split} split has {total} tokens, fewer than one global batch of "
          f"{self.global_batch} rows of {row_len}: lower the batch size or sequence length, or "
          "prepare more text.")
    self._epoch_cache: dict = {}

  def _epoch(self, epoch: int):
    """Packs the epoch's shuffled stories into rows (next-fit); returns per-piece arrays."""
    cache = self.__dict__.setdefault("_epoch_cache", {})
    if epoch in cache:
      return cache[epoch]
    row_len = self.seq_len + 1
    order = self._rng(epoch).permutation(len(self.offsets) - 1)
    starts, lengths = self.offsets[:-1][order], np.diff(self.offsets)[order]
    # Cut stories longer than a row into row-sized pieces.
    n_pieces = -(-lengths // row_len)
    piece_story = np.repeat(np.arange(len(order)), n_pieces)
    first = np.cumsum(n_pieces) - n_pieces
    k = np.arange(len(piece_story)) - np.repeat(first, n_pieces)
    piece_start = starts[piece_story] + k * row_len
    piece_len = np.minimum(row_len, lengths[piece_story] - k * row_len)
    # Next-fit: a piece goes on the current row if it fits, otherwise it opens a new row.
    piece_row = np.empty(len(piece_len), np.int64)
    piece_col = np.empty(len(piece_len), np.int64)
    row, col = 0, 0
    for i, n in enumerate(piece_len.tolist()):
      if col + n > row_len:
        row, col = row + 1, 0
      piece_row[i], piece_col[i] = row, col
      col += n
    row_first_piece = np.searchsorted(piece_row, np.arange(row + 2))
    cache.clear()
    cache[epoch] = (piece_start, piece_len, piece_row, piece_col, row_first_piece)
    return cache[epoch]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, rows = self._rows(index)
    piece_start, piece_len, piece_row, piece_col, row_first = self._epoch(epoch)
    row_len = self.seq_len + 1
    lo, hi = row_first[rows[0]], row_first[rows[-1] + 1]
    lens = piece_len[lo:hi]
    local_row = piece_row[lo:hi] - rows[0]
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    dest_row = np.repeat(local_row, lens)
    dest_col = np.repeat(piece_col[lo:hi], lens) + within
    tokens = np.full((self.batch_size, row_len), self.pad_id, np.int32)
    segments = np.zeros((self.batch_size, row_len), np.int32)
    positions = np.zeros((self.batch_size, row_len), np.int32)
    tokens[dest_row, dest_col] = self.tokens[np.repeat(piece_start[lo:hi], lens) + within]
    # Segment ids number the pieces of each row from 1.
    seg_of_piece = np.arange(lo, hi) - row_first[piece_row[lo:hi]] + 1
    segments[dest_row, dest_col] = np.repeat(seg_of_piece, lens)
    positions[dest_row, dest_col] = within
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": same.astype(np.float32), "segment_ids": segments[:, :-1],
            "positions": positions[:, :-1]}


def train_dataset(data_dir: str | pathlib.Path, *, split: str = "train", batch_size: int,
                  seq_len: int, seed: int, packed: bool = False, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.MapDataset:
  """An endless, shuffled Grain dataset of this process's training batches.

  Args:
    data_dir: a directory written by `prepare`.
    split: which split to read.
    batch_size: rows per batch on this process (the global batch is this times ``shard_count``).
    seq_len: tokens per row fed to the model (each row reads ``seq_len + 1`` tokens).
    seed: shuffling seed; the same seed gives the same batches.
    packed: pack whole stories with segment ids instead of cutting fixed windows.
    shard_index: this process's index; defaults to ``jax.process_index()``.
    shard_count: the number of processes; defaults to ``jax.process_count()``.
  """
  if batch_size < 1 or seq_len < 1:
    raise DataError(f"batch size ({batch_size}) and sequence length ({seq_len}) must be positive.")
  data = PreparedData.load(data_dir)
  shard_index, shard_count = _default_shards(shard_index, shard_count)
  args = (data, split, batch_size, seq_len, seed, shard_index, shard_count)
  if packed:
    source = _PackedBatches(*args, pad_id=int(data.metadata["pad_id"]))
  else:
    source = _WindowBatches(*args)
  return grain.MapDataset.source(source)


def make_iterator(dataset: grain.MapDataset, *, worker_count: int = 0,
                  worker_buffer_size: int = 2, thread_prefetch: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator over ``dataset``.

  Args:
    dataset: from `train_dataset`.
    worker_count: worker processes that build batches (Grain ``mp_prefetch``); worth it only when
      batch building is slower than moving a batch between processes.
    worker_buffer_size: batches each worker keeps ready.
    thread_prefetch: batches a background thread keeps ready in this process (0: none). Batches
      are one numpy gather each, so a thread usually beats worker processes (BUILD.md).
  """
  ds = dataset.to_iter_dataset()
  if thread_prefetch > 0 and worker_count == 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=thread_prefetch)
  if worker_count > 0:
    # Grain's worker processes read absl flags; outside an absl main (a notebook, a test) they
    # have not been parsed, and their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return iter(ds)


def eval_batches(data_dir: str | pathlib.Path, *, split: str = "valid", batch_size: int,
                 seq_len: int, max_batches: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic batches that predict every token of the split exactly once.

  Rows are consecutive, non-overlapping windows; the last row and batch are padded with
  ``loss_mask`` 0. Every process gets the same number of batches (padding rows where needed).
  """
  data = PreparedData.load(data_dir)
  shard_index, shard_count = _default_shards(shard_index, shard_count)
  tokens = data.tokens(split)
  n = len(tokens)
  if n < 2:
    raise DataError(f"the {split} split has fewer than 2 tokens: prepare a larger split.")
  num_rows = -(-(n - 1) // seq_len)
  global_batch = batch_size * shard_count
  num_batches = -(-num_rows // global_batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  pad = int(data.metadata["pad_id"])
  cols = np.arange(seq_len + 1)
  for b in range(num_batches):
    first = b * global_batch + shard_index * batch_size
    starts = (first + np.arange(batch_size)) * seq_len
    idx = starts[:, None] + cols
    valid = idx < n
    window = np.where(valid, tokens[np.minimum(idx, n - 1)], pad).astype(np.int32)
    yield {"inputs": window[:, :-1], "targets": window[:, 1:],
           "loss_mask": valid[:, 1:].astype(np.float32)}

