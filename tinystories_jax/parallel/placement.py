"""Host -> device batch placement: the only place training data crosses onto the mesh."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from tinystories_jax.parallel import rules


def place_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes.

  Args:
    batch: this process's slice of the global batch, `[B_local, ...]` numpy arrays.
    mesh: the training mesh; the global batch has `B_local * process_count` rows.

  Returns:
    The same keys as global `jax.Array`s.
  """
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    sharding = rules.batch_sharding(mesh, local.ndim)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out
