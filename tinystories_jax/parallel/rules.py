"""Logical axis names -> mesh axes: the one table that decides how parameters are sharded.

Models annotate each parameter dimension with a logical name (`nnx.with_partitioning`); this module
maps those names onto the `(data, fsdp, tensor)` mesh. A dimension the mesh axis does not divide is
replicated instead (a 4-head kv projection on an 8-way tensor axis), and a mesh axis is used at most
once per array.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Megatron-style tensor parallelism over heads / MLP width / vocabulary, ZeRO-3-style FSDP over the
# model width. Everything else (norm scales, head_dim, positions, stacked layers) is replicated.
LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "positions": None,
    "norm": None,
    "layers": None,
}


def _mesh_axes(name, rules) -> tuple[str, ...]:
  if name is None:
    return ()
  if name not in rules:
    raise ValueError(f"Logical axis {name!r} has no sharding rule; add it to "
                     "tinystories_jax.parallel.rules.LOGICAL_RULES.")
  target = rules[name]
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int],
                         mesh: jax.sharding.Mesh,
                         rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
  """Maps one array's logical axis names to a PartitionSpec valid for `shape` on `mesh`."""
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = []
    for axis in _mesh_axes(name, rules):
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (size * max(1, _prod(mesh.shape[a] for a in axes))):
        continue  # uneven: replicate this dimension over `axis` rather than pad
      axes.append(axis)
      used.add(axis)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _prod(xs) -> int:
  n = 1
  for x in xs:
    n *= x
  return n


def logical_names(abstract_state: nnx.State) -> dict:
  """Pure-dict tree of each variable's logical axis names (a tuple, or () when unannotated)."""
  specs = nnx.get_partition_spec(abstract_state)
  pure = nnx.to_pure_dict(specs)
  return jax.tree.map(lambda p: tuple(p) if isinstance(p, P) else (), pure,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def state_shardings(abstract_pure: Any, names: Any, mesh: jax.sharding.Mesh,
                    rules: Mapping[str, Any] = LOGICAL_RULES) -> Any:
  """NamedShardings for a pure-dict parameter tree, given its logical names tree."""
  return jax.tree.map(
      lambda x, n: NamedSharding(mesh, logical_to_mesh_spec(n, x.shape, mesh, rules)),
      abstract_pure, names)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch array: rows split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(_mesh_axes("batch", LOGICAL_RULES), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
