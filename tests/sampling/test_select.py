"""Next-token choice on its own: the vectorised argmax and nucleus sampling past the candidates."""

import numpy as np

import jax
import jax.numpy as jnp

from tinystories_jax.sampling import select


def test_argmax_equals_jnp_argmax_ties_included():
  x = np.random.default_rng(0).integers(0, 5, (16, 300)).astype(np.float32)  # many ties
  x[3] = -np.inf
  np.testing.assert_array_equal(np.asarray(jax.jit(select.argmax)(jnp.asarray(x))),
                                np.argmax(x, axis=-1))


def _nucleus(logits_v, top_p):
  probs = np.exp(logits_v - logits_v.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  return set(order[before < top_p].tolist())


def test_top_p_draws_inside_the_nucleus_from_candidates_and_from_the_whole_vocabulary():
  """A vocabulary larger than NUCLEUS_CANDIDATES: peaked rows take the candidates' path, a flat
  row makes the batch sort everything; either way every draw is in the row's nucleus and,
  over many draws, every nucleus token of the peaked rows shows up."""
  v, top_p = 4 * select.NUCLEUS_CANDIDATES, 0.9
  rng = np.random.default_rng(1)
  peaked = rng.normal(size=(3, v)).astype(np.float32) * 4.0
  flat = rng.normal(size=(1, v)).astype(np.float32) * 0.1
  mode = ("sample", 1.0, 0, top_p, 0)
  choose = jax.jit(lambda lg, keys, count: select.choose(lg, keys, count, mode=mode, eos_id=0))
  for logits in (peaked, np.concatenate([peaked, flat])):
    b = logits.shape[0]
    nuclei = [_nucleus(row.astype(np.float64), top_p) for row in logits]
    assert all(len(n) < select.NUCLEUS_CANDIDATES for n in nuclei[:3])
    keys = select.row_keys(list(range(b)), [0] * b)
    seen = [set() for _ in range(b)]
    for n in range(200):
      picks = np.asarray(choose(jnp.asarray(logits), keys, jnp.full((b,), n, jnp.int32)))
      for i, t in enumerate(picks):
        assert int(t) in nuclei[i], (i, int(t))
        seen[i].add(int(t))
    for i in range(3):
      likely = {t for t in nuclei[i] if np.exp(logits[i, t] - logits[i].max()) > 0.2}
      assert likely <= seen[i]
