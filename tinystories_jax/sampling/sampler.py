"""Batched, KV-cached decoding of token prompts: one jitted prefill, then a `lax.while_loop`.

    sampler = Sampler(model, eos_id=tok.eos_id)
    outs = sampler.generate([[bos, *tok.encode("Once upon a time")]], SamplerConfig())
    outs[0].tokens, outs[0].finish_reason            # new ids (EOS excluded), "stop" | "length"

The decode loop runs entirely on the device: no host round trip per token. The loop state (cache
included) is donated to each call, so the cache is updated in place. When the caller streams
text or checks stop strings, the loop runs in chunks of `stream_chunk` tokens and returns to the
host between chunks; otherwise one call decodes everything.

Shapes are bucketed so a server sees few compilations: the batch is padded to a power of two
(rows that are born finished), prompts are left-padded to a multiple of `prompt_bucket`, and the
new-token budget rounds up to a multiple of 32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinystories_jax.sampling import beam, kv_cache, select
from tinystories_jax.sampling.config import SamplerConfig, SamplerError

# Called between chunks with every row's new tokens so far and whether it has finished;
# returns rows to finish now (stop strings), or None.
OnUpdate = Callable[[list[list[int]], list[bool]], "Sequence[bool] | None"]


@dataclasses.dataclass
class Completion:
  """One continuation: new token ids (the end-of-story token excluded) and why it ended."""
  tokens: list[int]
  finish_reason: str  # "stop" (end of story or a stop string) or "length"
  score: float | None = None  # beam search: the length-normalised log-probability


class LoopState(NamedTuple):
  """The decode loop's carry (donated between calls)."""
  cache: kv_cache.KVCache
  tokens_bn: jax.Array  # int32 [B, N] new tokens, -1 where none
  last_b: jax.Array     # int32 [B] newest token, fed at the next step
  count_b: jax.Array    # int32 [B] new tokens written
  done_b: jax.Array     # bool [B]
  eos_b: jax.Array      # bool [B] ended by the end-of-story token
  limit_b: jax.Array    # int32 [B] new-token budget of each row
  keys_b: jax.Array     # typed PRNG keys [B]
  step: jax.Array       # int32 scalar: decode steps taken


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _batch_bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class Sampler:
  """Compiled decoding for one model; safe to reuse across calls (compilations are cached).

  Args:
    model: a `CausalLM` with its parameters.
    eos_id: the end-of-story token id.
    prompt_bucket: prompts are left-padded to a multiple of this many tokens.
    stream_chunk: tokens decoded per device call when streaming or checking stop strings.
    matmul_dtype: "bfloat16" makes every matrix product of a decode step take bfloat16 inputs
      (weights stored in bfloat16, activations rounded) and accumulate in float32; attention,
      norms and the softmax keep the model's dtype. The parameters are rounded to bfloat16 once,
      here, so the prompt's pass uses the same weights. On a CPU this streams half the weight
      bytes at batch 1 and runs XLA's faster bfloat16 matmul at larger batches
      (docs/sampling.md, "bfloat16 matmuls"); the stories are those of the rounded model. None
      (default): the model's own dtype throughout (for a bfloat16 model that is the same).
    chunked_cache: hold each layer's KV cache in chunks and let a decode step skip the chunks
      nothing has been written to yet (a `lax.cond` each), or keep it whole and attend to every
      slot under the mask. None (default): chunked on a CPU, where a batched step's attention is
      bound by the cache bytes it reads and this halves them on average (docs/sampling.md);
      whole elsewhere.
  """

  def __init__(self, model, *, eos_id: int, prompt_bucket: int = 16, stream_chunk: int = 16,
               matmul_dtype: str | None = None, chunked_cache: bool | None = None):
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    if matmul_dtype not in (None, "bfloat16"):
      raise SamplerError(f"matmul_dtype={matmul_dtype!r}: use bfloat16, or None for the model's "
                         "own dtype.")
    self.matmul_dtype = jnp.dtype(matmul_dtype or model.cfg.dtype)
    if matmul_dtype:
      self.params = jax.tree.map(_round_to(jnp.bfloat16), self.params)
    self._weights: dict[bool, kv_cache.DecodeWeights] = {}
    self.chunked_cache = (jax.default_backend() == "cpu" if chunked_cache is None
                          else bool(chunked_cache))
    self.eos_id = int(eos_id)
    self.prompt_bucket = prompt_bucket
    self.stream_chunk = stream_chunk

  def weights_for(self, batch: int) -> kv_cache.DecodeWeights:
    """The decode step's packed weights for a padded batch of `batch` rows (built once each):
    [out, in] rows for one row on 16-bit weights on a CPU (where that layout was measured
    faster), [in, out] columns otherwise."""
    rows = (batch == 1 and self.matmul_dtype.itemsize == 2
            and jax.default_backend() == "cpu")
    if rows not in self._weights:
      model = nnx.merge(self.graphdef, self.params)
      self._weights[rows] = kv_cache.decode_weights(model, rows=rows, dtype=self.matmul_dtype)
    return self._weights[rows]

  def max_sequence(self) -> int:
    """Most slots (prompt + new tokens) a sequence may use: the model's `max_positions`."""
    return self.cfg.max_positions

  def generate(self, prompts: Sequence[Sequence[int]], config: SamplerConfig, *,
               streams: Sequence[int] | None = None, limits: Sequence[int] | None = None,
               seeds: Sequence[int] | None = None, on_update: OnUpdate | None = None,
               num_return: int = 1) -> list[list[Completion]]:
    """Continues every prompt.

    Args:
      prompts: token ids, each non-empty (the text layer prefixes BOS).
      config: decoding settings; `config.seed` with `streams[b]` keys row b's randomness.
      streams: per-row stream numbers (default 0, 1, 2, ...): equal seed and stream give equal text.
      limits: per-row new-token budgets (default `config.max_new_tokens`; none may exceed it).
      seeds: per-row seeds (default `config.seed` for every row).
      on_update: see `OnUpdate`; called between chunks (sampling and greedy only).
      num_return: continuations per prompt: beam search returns its best `num_return` beams;
        otherwise must be 1 (pass the prompt several times with different streams instead).

    Returns:
      For each prompt, a list of `num_return` completions (best first for beams).
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
      return []
    n = len(prompts)
    streams = list(range(n)) if streams is None else list(streams)
    limits = [config.max_new_tokens] * n if limits is None else [int(x) for x in limits]
    seeds = [config.seed] * n if seeds is None else [int(x) for x in seeds]
    self.check(prompts, config, limits)
    if config.num_beams > 1:
      if not 1 <= num_return <= config.num_beams:
        raise SamplerError(f"beam search can return 1 to num_beams ({config.num_beams}) "
                           f"continuations, not {num_return}.")
      return beam.beam_search(self, prompts, config, limits, num_return)
    if num_return != 1:
      raise SamplerError("sampling returns one continuation per prompt; repeat the prompt with "
                         "different streams for more.")
    return [[c] for c in self._sample(prompts, config, streams, limits, seeds, on_update)]

  def check(self, prompts, config: SamplerConfig, limits) -> None:
    """Raises SamplerError for an empty prompt, a bad budget, or a sequence past the model."""
    for i, (p, limit) in enumerate(zip(prompts, limits)):
      if not p:
        raise SamplerError(f"prompt {i} has no tokens; every prompt needs at least the BOS token.")
      if not 0 <= limit <= config.max_new_tokens:
        raise SamplerError(f"row {i} asks for {limit} new tokens, outside 0..max_new_tokens "
                           f"({config.max_new_tokens}).")
      if len(p) + limit > self.max_sequence():
        raise SamplerError(
            f"prompt {i} has {len(p)} tokens and asks for {limit} more, past the model's "
            f"{self.max_sequence()} positions; shorten the prompt or lower max_new_tokens.")
      if any(not 0 <= t < self.cfg.vocab_size for t in p):
        raise SamplerError(f"prompt {i} holds token ids outside the model's vocabulary "
                           f"(0..{self.cfg.vocab_size - 1}).")

  # ----------------------------------------------------------------------------------------------

  def pad_batch(self, prompts, limits, streams):
    """Left-padded int32 tokens [B', P], pad_b, limits and streams (or seeds), B' a power of
    two."""
    n = len(prompts)
    b = _batch_bucket(n)
    p = _round_up(max(len(x) for x in prompts), self.prompt_bucket)
    tokens = np.zeros((b, p), np.int32)
    pad = np.full((b,), p - 1, np.int32)
    for i, x in enumerate(prompts):
      tokens[i, p - len(x):] = x
      pad[i] = p - len(x)
    lim = np.zeros((b,), np.int32)  # filler rows have no budget: finished from the start
    lim[:n] = limits
    strm = list(streams) + [0] * (b - n)
    return tokens, pad, lim, strm

  def _sample(self, prompts, config: SamplerConfig, streams, limits, seeds, on_update):
    n = len(prompts)
    tokens, pad, lim, strm = self.pad_batch(prompts, limits, streams)
    seeds = list(seeds) + [0] * (len(strm) - n)
    max_new = max(limits)
    budget = _round_up(max(max_new, 1), 32)
    seq_len = tokens.shape[1] + budget
    mode = config.decode_key()
    keys = select.row_keys(seeds, strm)
    state = _prefill(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(pad),
                     jnp.asarray(lim), keys, seq_len=seq_len, budget=budget, mode=mode,
                     eos_id=self.eos_id, chunked=self.chunked_cache)
    chunk = self.stream_chunk if on_update is not None else max_new
    stopped = np.zeros((n,), bool)
    step = 1  # the prefill chose the first token
    while True:
      if step < max_new:
        step = min(step + chunk, max_new)
        state = _decode(self.graphdef, self.params, self.weights_for(len(strm)), state,
                        jnp.asarray(step, jnp.int32), mode=mode, eos_id=self.eos_id)
      done = np.asarray(state.done_b)[:n] | stopped
      finished = bool(done.all()) or step >= max_new
      if on_update is not None:
        rows = _rows(np.asarray(state.tokens_bn)[:n], np.asarray(state.count_b)[:n])
        stop_now = on_update(rows, [bool(d) for d in done])
        if stop_now is not None:
          newly = np.asarray(stop_now, bool) & ~done
          if newly.any():
            stopped |= newly
            done_b = np.asarray(state.done_b).copy()
            done_b[:n] |= stopped
            state = state._replace(done_b=jnp.asarray(done_b))
            finished = finished or bool((np.asarray(state.done_b)[:n]).all())
      if finished:
        break
    host = jax.device_get((state.tokens_bn, state.count_b, state.eos_b))
    rows = _rows(host[0][:n], host[1][:n])
    return [Completion(r, "stop" if (host[2][i] or stopped[i]) else "length")
            for i, r in enumerate(rows)]


def _round_to(dtype):
  def f(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype).astype(x.dtype)
    return x
  return f


def _rows(tokens_bn: np.ndarray, count_b: np.ndarray) -> list[list[int]]:
  return [tokens_bn[i, :count_b[i]].tolist() for i in range(len(count_b))]


def record(state: LoopState, token_b: jax.Array, *, eos_id: int) -> LoopState:
  """Writes each active row's new token, finishing rows at EOS or at their budget."""
  active = ~state.done_b
  is_eos = token_b == eos_id
  write = active & ~is_eos
  column = jnp.where(write, token_b, -1)[:, None]
  old = jax.lax.dynamic_slice_in_dim(state.tokens_bn, state.step, 1, axis=1)
  tokens_bn = jax.lax.dynamic_update_slice_in_dim(
      state.tokens_bn, jnp.where(write[:, None], column, old), state.step, axis=1)
  count_b = state.count_b + write.astype(jnp.int32)
  eos_b = state.eos_b | (active & is_eos)
  done_b = state.done_b | eos_b | (count_b >= state.limit_b)
  return state._replace(tokens_bn=tokens_bn, last_b=jnp.where(write, token_b, state.last_b),
                        count_b=count_b, done_b=done_b, eos_b=eos_b, step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "seq_len", "budget", "mode", "eos_id",
                                             "chunked"))
def _prefill(graphdef, params, tokens_bp, pad_b, limit_b, keys_b, *, seq_len, budget, mode,
             eos_id, chunked):
  model = nnx.merge(graphdef, params)
  logits_bv, cache = kv_cache.prefill(model, tokens_bp, pad_b, seq_len, chunked=chunked)
  b = tokens_bp.shape[0]
  zeros = jnp.zeros((b,), jnp.int32)
  state = LoopState(cache=cache, tokens_bn=jnp.full((b, budget), -1, jnp.int32),
                    last_b=tokens_bp[:, -1], count_b=zeros, done_b=limit_b <= 0,
                    eos_b=jnp.zeros((b,), bool), limit_b=limit_b, keys_b=keys_b,
                    step=jnp.zeros((), jnp.int32))
  token_b = select.choose(logits_bv, keys_b, zeros, mode=mode, eos_id=eos_id)
  return record(state, token_b, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "eos_id"), donate_argnums=(3,),
                   compiler_options=kv_cache.DECODE_COMPILER_OPTIONS)
def _decode(graphdef, params, weights, state: LoopState, stop_step, *, mode, eos_id):
  model = nnx.merge(graphdef, params)

  def cond(s: LoopState):
    return (s.step < stop_step) & ~jnp.all(s.done_b)

  def body(s: LoopState):
    logits_bv, cache = kv_cache.decode_step(model, s.cache, s.last_b, weights)
    token_b = select.choose(logits_bv, s.keys_b, s.count_b, mode=mode, eos_id=eos_id)
    return record(s._replace(cache=cache), token_b, eos_id=eos_id)

  return jax.lax.while_loop(cond, body, state)
