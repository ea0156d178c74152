"""The sampler against the full forward pass: greedy, top-k, top-p, beams, batching, EOS, seeds."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tinystories_jax.sampling import Sampler, SamplerConfig, SamplerError, kv_cache

import sampling_helpers

EOS = 2
WIDTH = 64  # the reference forward runs on one fixed length (causal: padding changes nothing)
# Lengths 3, 2 and 14: one prompt bucket (16 slots), so every test shares the compiled shapes.
PROMPTS = [[1, 5, 7], [1, 9], [1, 4, 4, 4, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
# One sampling mode shared by the tests that need randomness (each mode is a compilation).
SAMPLING = dict(temperature=1.0, top_p=0.9)


@functools.lru_cache(maxsize=None)
def _setup(family):
  model = sampling_helpers.tiny_model(family)
  forward = jax.jit(lambda t: nnx.merge(*nnx.split(model))(t)[0])

  def logits_of(seq):
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(forward(jnp.asarray(padded)))[len(seq) - 1]

  return model, Sampler(model, eos_id=EOS), logits_of


@pytest.fixture(scope="module", params=["gpt_neo", "llama"])
def setup(request):
  """Both families: for the equalities with the full forward pass."""
  return _setup(request.param)


@pytest.fixture(scope="module")
def llama():
  """One family for the decoding modes (they share the decode loop, not the model code)."""
  return _setup("llama")


def reference_greedy(logits_of, prompt, n, min_new=0):
  seq, out = list(prompt), []
  for i in range(n):
    logits = logits_of(seq).copy()
    if i < min_new:
      logits[EOS] = -np.inf
    token = int(np.argmax(logits))
    if token == EOS:
      return out, "stop"
    out.append(token)
    seq.append(token)
  return out, "length"


def test_greedy_equals_stepwise_argmax_of_the_full_forward(setup):
  _, sampler, logits_of = setup
  outs = sampler.generate(PROMPTS, SamplerConfig(temperature=0, max_new_tokens=20))
  for prompt, [got] in zip(PROMPTS, outs):
    want, reason = reference_greedy(logits_of, prompt, 20)
    assert got.tokens == want
    assert got.finish_reason == reason


def test_top_k_one_equals_greedy(llama):
  _, sampler, _ = llama
  greedy = sampler.generate(PROMPTS, SamplerConfig(temperature=0, max_new_tokens=20))
  top1 = sampler.generate(PROMPTS, SamplerConfig(top_k=1, temperature=1.5, max_new_tokens=20))
  assert [g[0].tokens for g in greedy] == [a[0].tokens for a in top1]


def test_beam_search_with_one_beam_is_greedy(llama):
  """The beam-search loop itself (not the greedy shortcut) reduces to greedy at one beam."""
  _, sampler, _ = llama
  from tinystories_jax.sampling import beam  # noqa: PLC0415

  config = SamplerConfig(temperature=0, max_new_tokens=20)
  greedy = sampler.generate(PROMPTS, config)
  beams = beam.beam_search(sampler, PROMPTS, config, [20] * len(PROMPTS), 1)
  for g, b in zip(greedy, beams):
    assert g[0].tokens == b[0].tokens
    assert g[0].finish_reason == b[0].finish_reason


def test_a_batch_of_different_lengths_equals_each_prompt_alone(setup):
  _, sampler, _ = setup
  for config in (SamplerConfig(temperature=0, max_new_tokens=12),
                 SamplerConfig(**SAMPLING, max_new_tokens=12, seed=5)):
    together = sampler.generate(PROMPTS, config)
    for i, prompt in enumerate(PROMPTS):
      [[alone]] = sampler.generate([prompt], config, streams=[i])
      assert alone.tokens == together[i][0].tokens


def test_eos_ends_a_row_and_min_new_tokens_forbids_it(llama):
  model, _, logits_of = llama
  prompt = PROMPTS[0]
  free, _ = reference_greedy(logits_of, prompt, 10)
  # Declare the first greedy token not seen before position 2 the end of the story.
  at = next(i for i in range(2, 10) if free[i] not in free[:i])
  eos = free[at]
  sampler = Sampler(model, eos_id=eos)
  [[stopped]] = sampler.generate([prompt], SamplerConfig(temperature=0, max_new_tokens=10))
  assert stopped.tokens == free[:at] and stopped.finish_reason == "stop"
  [[longer]] = sampler.generate([prompt], SamplerConfig(temperature=0, max_new_tokens=10,
                                                        min_new_tokens=at + 3))
  assert len(longer.tokens) >= at + 3 and eos not in longer.tokens[:at + 3]
  assert longer.tokens[:at] == free[:at]


def test_seed_gives_the_same_story_and_another_seed_another(llama):
  _, sampler, _ = llama
  config = SamplerConfig(**SAMPLING, max_new_tokens=16, seed=3)
  a = sampler.generate(PROMPTS, config)
  b = sampler.generate(PROMPTS, config)
  c = sampler.generate(PROMPTS, SamplerConfig(**SAMPLING, max_new_tokens=16, seed=4))
  assert [x[0].tokens for x in a] == [x[0].tokens for x in b]
  assert [x[0].tokens for x in a] != [x[0].tokens for x in c]


def test_top_p_samples_only_inside_the_nucleus(llama):
  _, sampler, logits_of = llama
  outs = sampler.generate(PROMPTS, SamplerConfig(**SAMPLING, max_new_tokens=16, seed=3))
  for prompt, [out] in zip(PROMPTS, outs):
    seq = list(prompt)
    for token in out.tokens:
      logits = logits_of(seq).astype(np.float64) / SAMPLING["temperature"]
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      before = np.cumsum(probs[order]) - probs[order]
      nucleus = set(order[before < SAMPLING["top_p"] - 1e-6].tolist()) | {int(order[0])}
      assert token in nucleus
      seq.append(token)


def test_top_k_samples_only_among_the_k_likeliest(llama):
  _, sampler, logits_of = llama
  outs = sampler.generate(PROMPTS[:2], SamplerConfig(temperature=5.0, top_k=3, top_p=1.0,
                                                     max_new_tokens=10, seed=1))
  for prompt, [out] in zip(PROMPTS, outs):
    seq = list(prompt)
    for token in out.tokens:
      top3 = np.argsort(-logits_of(seq))[:3]
      assert token in top3
      seq.append(token)


def test_beam_scores_are_length_normalised_log_probabilities(llama):
  _, sampler, logits_of = llama
  config = SamplerConfig(num_beams=3, temperature=0, max_new_tokens=10, length_penalty=0.7)
  [beams] = sampler.generate([PROMPTS[1]], config, num_return=3)
  assert len(beams) == 3
  scores = [b.score for b in beams]
  assert scores == sorted(scores, reverse=True)
  for b in beams:
    seq, total = list(PROMPTS[1]), 0.0
    ended = b.tokens + ([EOS] if b.finish_reason == "stop" else [])
    for token in ended:
      logits = logits_of(seq).astype(np.float64)
      total += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      seq.append(token)
    assert b.score == pytest.approx(total / len(ended) ** 0.7, abs=1e-4)


def test_prompt_and_setting_errors_name_the_fix(llama):
  _, sampler, _ = llama
  with pytest.raises(SamplerError, match="past the model's 96 positions"):
    sampler.generate([[1] * 90], SamplerConfig(max_new_tokens=10))
  with pytest.raises(SamplerError, match="at least the BOS"):
    sampler.generate([[]], SamplerConfig(max_new_tokens=10))
  with pytest.raises(SamplerError, match="outside the model's vocabulary"):
    sampler.generate([[1, 999]], SamplerConfig(max_new_tokens=10))
  for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
              dict(min_new_tokens=9, max_new_tokens=8), dict(num_beams=0), dict(stop=("",))):
    with pytest.raises(SamplerError):
      SamplerConfig(**bad)


def test_chunked_and_whole_caches_write_the_same_stories(setup):
  """40 new tokens after a 16-slot prompt bucket: an 80-slot cache, two chunks (64 + 16) when
  chunked, of which the second is skipped until written. Greedy, sampled and beam output match
  the whole-cache layout; the default chunks on a CPU only."""
  model, default, _ = setup
  assert default.chunked_cache == (jax.default_backend() == "cpu")
  chunked = Sampler(model, eos_id=EOS, chunked_cache=True)
  whole = Sampler(model, eos_id=EOS, chunked_cache=False)
  for config in (SamplerConfig(temperature=0, max_new_tokens=40),
                 SamplerConfig(**SAMPLING, max_new_tokens=40, seed=3),
                 SamplerConfig(temperature=0, num_beams=2, max_new_tokens=40)):
    a, b = chunked.generate(PROMPTS, config), whole.generate(PROMPTS, config)
    assert [[c.tokens for c in r] for r in a] == [[c.tokens for c in r] for r in b], config
  assert len(kv_cache.chunk_sizes(80)) == 2 and kv_cache.chunk_sizes(80, chunked=False) == (80,)


def test_bfloat16_matmuls_write_the_same_story_alone_and_batched(llama):
  """matmul_dtype="bfloat16": a lone prompt runs the [out, in] matrix-vector layout, a batch the
  [in, out] one; both compute the same products, so greedy stories match. The sampler's own
  parameters are rounded (the caller's model is not), and other dtypes are refused."""
  model, _, _ = llama
  sampler = Sampler(model, eos_id=EOS, matmul_dtype="bfloat16")
  config = SamplerConfig(temperature=0, max_new_tokens=16)
  together = sampler.generate(PROMPTS, config)
  for i, prompt in enumerate(PROMPTS):
    [[alone]] = sampler.generate([prompt], config)
    assert alone.tokens == together[i][0].tokens
  # The [out, in] layout is the CPU's batch-1 path; other backends keep [in, out].
  assert sampler.weights_for(1).rows == (jax.default_backend() == "cpu")
  assert not sampler.weights_for(4).rows
  assert sampler.weights_for(1).out.dtype == jnp.bfloat16
  w = np.asarray(model.embedding[...])
  assert w.dtype == np.float32 and not np.array_equal(w, w.astype(jnp.bfloat16).astype(np.float32))
  with pytest.raises(SamplerError, match="matmul_dtype='int8'"):
    Sampler(model, eos_id=EOS, matmul_dtype="int8")
