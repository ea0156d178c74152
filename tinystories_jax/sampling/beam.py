"""Beam search over the KV cache, in one jitted prefill and one `lax.while_loop`.

Scoring follows transformers' `generate(num_beams=N, early_stopping=True)`: each step ranks the
2N best one-token extensions of the N live beams; an extension ending in the end-of-story token
that ranks among the first N becomes a finished story scored by its log-probability divided by
length ** length_penalty (length counts the new tokens and the end token); the N best other
extensions live on. A prompt is done once N stories have finished, or when it reaches its budget
(the live beams then finish as "length"). With one beam this is exactly greedy decoding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinystories_jax.sampling import kv_cache, select

NEG_INF = float("-inf")


class BeamState(NamedTuple):
  cache: kv_cache.KVCache  # batch B * N, beams of a prompt adjacent
  alive_seq: jax.Array     # int32 [B, N, M]
  alive_logp: jax.Array    # float32 [B, N]
  last: jax.Array          # int32 [B * N], the token each live beam feeds next
  fin_seq: jax.Array       # int32 [B, N, M]
  fin_score: jax.Array     # float32 [B, N], -inf where empty
  fin_len: jax.Array       # int32 [B, N]
  fin_eos: jax.Array       # bool [B, N]
  done_b: jax.Array        # bool [B]
  limit_b: jax.Array       # int32 [B]
  step: jax.Array          # int32 scalar: new tokens every live beam holds


def beam_search(sampler, prompts, config, limits, num_return):
  """Best `num_return` beams of each prompt as lists of `Completion` (see `Sampler.generate`)."""
  from tinystories_jax.sampling.sampler import Completion, _round_up  # noqa: PLC0415

  n = len(prompts)
  tokens, pad, lim, _ = sampler.pad_batch(prompts, limits, [0] * n)
  max_new = max(limits)
  budget = _round_up(max(max_new, 1), 32)
  settings = dict(num_beams=config.num_beams, length_penalty=config.length_penalty,
                  min_new=config.min_new_tokens, eos_id=sampler.eos_id)
  state = _beam_prefill(sampler.graphdef, sampler.params, jnp.asarray(tokens), jnp.asarray(pad),
                        jnp.asarray(lim), seq_len=tokens.shape[1] + budget, budget=budget,
                        chunked=sampler.chunked_cache, **settings)
  if max_new > 1:
    weights = sampler.weights_for(tokens.shape[0] * config.num_beams)
    state = _beam_decode(sampler.graphdef, sampler.params, weights, state,
                         jnp.asarray(max_new, jnp.int32), **settings)
  seq, score, length, eos = jax.device_get(
      (state.fin_seq, state.fin_score, state.fin_len, state.fin_eos))
  out = []
  for b in range(n):
    order = np.argsort(-score[b], kind="stable")[:num_return]
    out.append([Completion(seq[b, i, :length[b, i]].tolist(), "stop" if eos[b, i] else "length",
                           float(score[b, i])) for i in order])
  return out


def _step(state: BeamState, logits_bnv: jax.Array, *, num_beams, length_penalty, min_new,
          eos_id) -> BeamState:
  """Extends every live beam by one token and updates the finished stories."""
  b, n, v = logits_bnv.shape
  s = state.step
  logp = jax.nn.log_softmax(logits_bnv, axis=-1)
  logp = select.forbid_early_eos(logp.reshape(b * n, v), jnp.full((b * n,), s), eos_id=eos_id,
                                 min_new_tokens=min_new).reshape(b, n, v)
  cand = (state.alive_logp[:, :, None] + logp).reshape(b, n * v)
  vals_bc, idx_bc = jax.lax.top_k(cand, 2 * n)
  beam_bc, tok_bc = idx_bc // v, idx_bc % v
  is_eos = tok_bc == eos_id
  length = (s + 1).astype(jnp.float32)
  norm = length ** length_penalty
  rank = jnp.arange(2 * n)[None, :]
  active = ~state.done_b[:, None]
  src_seq = jnp.take_along_axis(state.alive_seq, beam_bc[:, :, None], axis=1)  # [B, 2N, M]

  # Finished by the end token: only extensions ranked among the first N count.
  eos_score = jnp.where(is_eos & (rank < n) & active, vals_bc / norm, NEG_INF)
  # Live on: the N best extensions that do not end the story.
  keep_vals = jnp.where(is_eos, NEG_INF, vals_bc)
  alive_logp, pick = jax.lax.top_k(keep_vals, n)
  alive_beam = jnp.take_along_axis(beam_bc, pick, axis=1)
  alive_tok = jnp.take_along_axis(tok_bc, pick, axis=1)
  alive_seq = jnp.take_along_axis(src_seq, pick[:, :, None], axis=1)
  alive_seq = jax.lax.dynamic_update_slice_in_dim(alive_seq, alive_tok[:, :, None], s, axis=2)
  # Out of budget: the live beams finish as they are.
  at_limit = (s + 1 >= state.limit_b)[:, None] & active
  limit_score = jnp.where(at_limit & jnp.isfinite(alive_logp), alive_logp / norm, NEG_INF)

  scores = jnp.concatenate([state.fin_score, eos_score, limit_score], axis=1)
  seqs = jnp.concatenate([state.fin_seq, src_seq, alive_seq], axis=1)
  lens = jnp.concatenate([state.fin_len, jnp.full((b, 2 * n), s), jnp.full((b, n), s + 1)],
                         axis=1)
  eoss = jnp.concatenate([state.fin_eos, jnp.ones((b, 2 * n), bool), jnp.zeros((b, n), bool)],
                         axis=1)
  fin_score, top = jax.lax.top_k(scores, n)
  fin_seq = jnp.take_along_axis(seqs, top[:, :, None], axis=1)
  fin_len = jnp.take_along_axis(lens, top, axis=1).astype(jnp.int32)
  fin_eos = jnp.take_along_axis(eoss, top, axis=1)
  done_b = state.done_b | at_limit[:, 0] | (jnp.isfinite(fin_score).sum(1) >= n)

  flat = (jnp.arange(b)[:, None] * n + alive_beam).reshape(-1)
  cache = state.cache._replace(k=jax.tree.map(lambda x: jnp.take(x, flat, axis=0), state.cache.k),
                               v=jax.tree.map(lambda x: jnp.take(x, flat, axis=0), state.cache.v))
  return BeamState(cache=cache, alive_seq=alive_seq, alive_logp=alive_logp,
                   last=alive_tok.reshape(-1).astype(jnp.int32), fin_seq=fin_seq,
                   fin_score=fin_score, fin_len=fin_len, fin_eos=fin_eos, done_b=done_b,
                   limit_b=state.limit_b, step=s + 1)


_STATIC = ("graphdef", "num_beams", "length_penalty", "min_new", "eos_id")


@functools.partial(jax.jit, static_argnames=_STATIC + ("seq_len", "budget", "chunked"))
def _beam_prefill(graphdef, params, tokens_bp, pad_b, limit_b, *, seq_len, budget, num_beams,
                  length_penalty, min_new, eos_id, chunked):
  model = nnx.merge(graphdef, params)
  logits_bv, cache = kv_cache.prefill(model, tokens_bp, pad_b, seq_len, chunked=chunked)
  b, n = tokens_bp.shape[0], num_beams
  cache = kv_cache.KVCache(jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), cache.k),
                           jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), cache.v),
                           jnp.repeat(cache.pad_b, n), cache.cur)
  # One real beam to start from; the others are empty (-inf) until the first step fills them.
  alive_logp = jnp.full((b, n), NEG_INF).at[:, 0].set(0.0)
  state = BeamState(
      cache=cache, alive_seq=jnp.full((b, n, budget), -1, jnp.int32), alive_logp=alive_logp,
      last=jnp.zeros((b * n,), jnp.int32), fin_seq=jnp.full((b, n, budget), -1, jnp.int32),
      fin_score=jnp.full((b, n), NEG_INF), fin_len=jnp.zeros((b, n), jnp.int32),
      fin_eos=jnp.zeros((b, n), bool), done_b=limit_b <= 0, limit_b=limit_b,
      step=jnp.zeros((), jnp.int32))
  logits_bnv = jnp.broadcast_to(logits_bv[:, None], (b, n, logits_bv.shape[-1]))
  return _step(state, logits_bnv, num_beams=num_beams, length_penalty=length_penalty,
               min_new=min_new, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(3,),
                   compiler_options=kv_cache.DECODE_COMPILER_OPTIONS)
def _beam_decode(graphdef, params, weights, state: BeamState, stop_step, *, num_beams,
                 length_penalty, min_new, eos_id):
  model = nnx.merge(graphdef, params)

  def cond(s: BeamState):
    return (s.step < stop_step) & ~jnp.all(s.done_b)

  def body(s: BeamState):
    logits_bv, cache = kv_cache.decode_step(model, s.cache, s.last, weights)
    b = s.done_b.shape[0]
    return _step(s._replace(cache=cache), logits_bv.reshape(b, num_beams, -1),
                 num_beams=num_beams, length_penalty=length_penalty, min_new=min_new,
                 eos_id=eos_id)

  return jax.lax.while_loop(cond, body, state)
