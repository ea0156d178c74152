"""The cached decode is the full forward pass evaluated incrementally."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tinystories_jax.sampling import kv_cache

import sampling_helpers


@pytest.mark.parametrize("chunk", [64, 3, "whole"], ids=["one-chunk", "chunks-of-3", "whole"])
@pytest.mark.parametrize("packed", [None, "columns", "rows"])
@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_cached_decode_equals_full_forward_at_every_position(family, packed, chunk, monkeypatch):
  """Two rows with different left padding; window 4 is shorter than the 14 tokens, so the local
  layer's ring buffer wraps several times. `packed`: the step runs on `decode_weights` (what the
  sampler uses), laid out [in, out] or [out, in], instead of the model's modules. `chunk` 3
  splits the global layer's 22 slots into 8 chunks (most of them empty at first, so skipped) and
  the local layer's ring of 4 into two, which the ring's writes cross. "whole": `chunked=False`
  keeps one array per layer even with 3-slot chunks configured."""
  chunked = chunk != "whole"
  monkeypatch.setattr(kv_cache, "CACHE_CHUNK", chunk if chunked else 3)
  model = sampling_helpers.tiny_model(family)
  weights = packed and kv_cache.decode_weights(model, rows=packed == "rows")
  rng = np.random.default_rng(0)
  seq_bt = rng.integers(0, 61, (2, 14))
  full_btv = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seq_bt)))
  prompt_lens = [3, 6]
  p = 8  # left-padded prompt slots
  tokens_bp = np.zeros((2, p), np.int32)
  for b, n in enumerate(prompt_lens):
    tokens_bp[b, p - n:] = seq_bt[b, :n]
  pad_b = jnp.asarray([p - n for n in prompt_lens], jnp.int32)
  seq_len = p + 14

  prefill = nnx.jit(lambda m, t, pad: kv_cache.prefill(m, t, pad, seq_len, all_logits=True,
                                                       chunked=chunked))
  step = nnx.jit(kv_cache.decode_step)
  logits_bpv, cache = prefill(model, jnp.asarray(tokens_bp), pad_b)
  logits_bpv = np.asarray(logits_bpv)
  for b, n in enumerate(prompt_lens):
    np.testing.assert_allclose(logits_bpv[b, p - n:], full_btv[b, :n], atol=1e-5, rtol=0)
  # Feed each row's own next tokens; row 0 is 3 tokens behind row 1 in its own positions.
  # The local layer's cache is the window, not the sequence.
  assert [c.shape[2] for c in cache.k[1]] == ([3, 1] if chunk == 3 else [4])
  assert [c.shape[2] for c in cache.k[0]] == ([3] * 7 + [1] if chunk == 3 else [seq_len])
  for i in range(14 - max(prompt_lens)):
    token_b = jnp.asarray([seq_bt[b, n + i] for b, n in enumerate(prompt_lens)], jnp.int32)
    logits_bv, cache = step(model, cache, token_b, weights)
    for b, n in enumerate(prompt_lens):
      np.testing.assert_allclose(np.asarray(logits_bv)[b], full_btv[b, n + i], atol=1e-5,
                                 rtol=0, err_msg=f"row {b} position {n + i}")


def test_prefill_longer_than_the_window_keeps_the_latest_keys():
  """A prompt longer than the window fills the ring with its last `window` keys."""
  model = sampling_helpers.tiny_model("gpt_neo")
  seq = np.random.default_rng(1).integers(0, 61, (1, 12))
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seq)))
  prefill = nnx.jit(lambda m, t, pad: kv_cache.prefill(m, t, pad, 12))
  step = nnx.jit(kv_cache.decode_step)
  logits, cache = prefill(model, jnp.asarray(seq[:, :9]), jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits)[0], full[0, 8], atol=1e-5, rtol=0)
  for t in range(9, 12):
    logits, cache = step(model, cache, jnp.asarray(seq[:, t]))
    np.testing.assert_allclose(np.asarray(logits)[0], full[0, t], atol=1e-5, rtol=0)


def test_cache_bytes_counts_window_layers_by_their_window():
  cfg = sampling_helpers.tiny_config("gpt_neo")  # layers: global, local (window 4)
  per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4
  assert kv_cache.cache_bytes(cfg, 3, 100) == 3 * per_slot * (100 + 4)
  assert kv_cache.layer_lengths(cfg, 2) == (2, 2)


def _steps(model, weights, seq_bt, p):
  """Prefills the first p tokens of every row, then feeds the rest one step at a time: the
  logits of every fed position, [B, T - p, V]."""
  prefill = nnx.jit(lambda m, t, pad: kv_cache.prefill(m, t, pad, seq_bt.shape[1]))
  step = nnx.jit(kv_cache.decode_step)
  _, cache = prefill(model, jnp.asarray(seq_bt[:, :p]), jnp.zeros((seq_bt.shape[0],), jnp.int32))
  out = []
  for t in range(p, seq_bt.shape[1]):
    logits_bv, cache = step(model, cache, jnp.asarray(seq_bt[:, t], jnp.int32), weights)
    out.append(np.asarray(logits_bv))
  return np.stack(out, axis=1)


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_bfloat16_matmuls_agree_in_both_layouts_and_track_the_model(family):
  """16-bit decode weights: every product takes bfloat16 inputs and accumulates in float32, in
  the [out, in] layout (batch-1 matrix-vector products) as in [in, out]; so the two layouts give
  the same logits up to float32 summation order, and both stay within bfloat16 rounding of the
  model's own float32 forward pass (with its weights rounded the same way)."""
  model = sampling_helpers.tiny_model(family)
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), params)
  model = nnx.merge(graphdef, params)
  seq_bt = np.random.default_rng(2).integers(0, 61, (2, 12))
  full_btv = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seq_bt)))[:, 6:]
  cols = _steps(model, kv_cache.decode_weights(model, dtype=jnp.bfloat16), seq_bt, 6)
  rows = _steps(model, kv_cache.decode_weights(model, rows=True, dtype=jnp.bfloat16), seq_bt, 6)
  exact = _steps(model, kv_cache.decode_weights(model), seq_bt, 6)
  np.testing.assert_allclose(exact, full_btv, atol=1e-5, rtol=0)
  np.testing.assert_allclose(rows, cols, atol=1e-5, rtol=0)
  scale = np.abs(full_btv).max()
  err = np.abs(cols - full_btv).max()
  assert 0 < err < 0.02 * scale, (err, scale)
