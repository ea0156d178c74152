"""Validation: mean next-token loss over the valid split, and bits per byte of its text."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from tinystories_jax.data import pipeline
from tinystories_jax.parallel import placement


def evaluate(eval_step: Callable, params: Any, extra: Any, mesh: jax.sharding.Mesh, *,
             data_dir: str, split_info: dict, batch_size: int, seq_len: int,
             max_batches: int | None, split: str = "valid") -> dict[str, float]:
  """Runs `eval_step` over the split (or its first `max_batches` batches).

  Args:
    eval_step: the jitted `(params, extra, batch) -> LossSums`.
    params, extra: the model's variables.
    mesh: the training mesh (batches are placed on it like training batches).
    data_dir: the prepared data directory.
    split_info: the split's entry in the data metadata (`tokens`, `text_bytes`).
    batch_size: rows per batch on this process.
    seq_len: tokens per row.
    max_batches: stop after this many batches (None: the whole split).
    split: which split to read.

  Returns:
    `eval_loss` (nats per token) and `eval_bpb` (bits per byte of text). When only part of the
    split is read, bits per byte extrapolates the mean loss to the split's token count.
  """
  nll = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for batch in pipeline.eval_batches(data_dir, split=split, batch_size=batch_size,
                                     seq_len=seq_len, max_batches=max_batches):
    sums = eval_step(params, extra, placement.place_batch(batch, mesh))
    nll, count = nll + sums.nll, count + sums.count
  nll, count = float(nll), float(count)
  mean = nll / max(count, 1.0)
  # Every token but the first is predicted exactly once when the whole split is read.
  predicted = max(1, int(split_info["tokens"]) - 1)
  return {"eval_loss": mean, "eval_bpb": pipeline.bits_per_byte(mean * predicted, split_info),
          "eval_tokens": int(count)}

